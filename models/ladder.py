"""Ladder Residual (Zhang et al., arXiv 2501.06589, ICML 2025) as single-device code.

Number the sublayers j = 1..N in order: the attention and the MLP of every transformer layer, or
every block of a hybrid stack (Mamba-2, attention and MLP alike), and write h_0 for the embedding
and h_j for the residual stream after sublayer j. Every sublayer still adds its output to the
stream; what changes is what it reads:

    standard sublayer:  h_j = h_{j-1} + f_j(norm_j(h_{j-1}))
    ladder sublayer:    h_j = h_{j-1} + f_j(norm_j(h_{j-2}))        (h_{-1} = h_0)

and the output is norm(h_N) = norm(h_{N-2} + f_{N-1} + f_N): the last two outputs, which no
sublayer read, are added before the final norm. `model.ladder_layers: k` makes the last k layers
ladder layers (the published recipe for converting a trained model); the first ladder sublayer
then reads h_{j-2}, the stream after the attention of the last standard layer, as the paper's
code feeds it. With k = 0 (or `model.residual: standard`) the model is the standard one.

The model runs the rule in *carry form*: the stream travels as (h, pending) where `pending` is
the newest sublayer output, not yet added. A ladder sublayer computes from h first and adds
`pending` afterwards; a standard sublayer adds it first. So the value a ladder sublayer does not
read is needed only after that sublayer has computed, which is what lets tensor parallelism
(parallel/ladder.py) keep the previous sublayer's all-reduce in flight while it computes: every
read of `pending` goes through `residual_sync`, which on one device returns it unchanged and
under tensor parallelism waits for its reduction to finish; a ladder sublayer's step is
`residual_sync.add_after(h, pending, sublayer)`, which under tensor parallelism also defers the
stream's input-gradient reduction in backward (parallel/ladder.py).
"""
from __future__ import annotations

import typing
from typing import Callable, Literal, Optional

import torch

Residual = Literal["standard", "ladder"]
RESIDUALS = typing.get_args(Residual)


def check_residual(residual: str, ladder_layers: Optional[int], n_layers: int) -> None:
    """One-line ValueError naming model.residual or model.ladder_layers when they do not fit."""
    if residual not in RESIDUALS:
        raise ValueError(f"model.residual: {residual!r} is not one of {', '.join(RESIDUALS)}")
    if ladder_layers is None:
        return
    if residual == "standard":
        raise ValueError(f"model.ladder_layers: {ladder_layers} is set but model.residual is standard; "
                         "set model.residual=ladder (or drop ladder_layers)")
    if isinstance(ladder_layers, bool) or not isinstance(ladder_layers, int) or not 0 <= ladder_layers <= n_layers:
        raise ValueError(f"model.ladder_layers: {ladder_layers!r} must be between 0 and model.n_layers={n_layers} "
                         "(the last k layers become ladder layers; leave it unset for all)")


def first_ladder_layer(cfg) -> int:
    """Index of the first ladder layer (n_layers when there is none)."""
    if cfg.residual != "ladder":
        return cfg.n_layers
    k = cfg.n_layers if cfg.ladder_layers is None else cfg.ladder_layers
    return cfg.n_layers - k


def is_ladder(cfg) -> bool:
    """Whether the model has any ladder layer (and so runs in carry form)."""
    return first_ladder_layer(cfg) < cfg.n_layers


class LocalSync:
    """The single-device `residual_sync`: a pending output is already complete."""

    def __call__(self, pending: torch.Tensor) -> torch.Tensor:
        return pending

    def add_after(self, h: torch.Tensor, pending: torch.Tensor,
                  compute: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + pending, compute(h)), reading `pending` only after `compute` ran. Under tensor
        parallelism (parallel/ladder.py) the stream node is made before `compute`, so that in
        backward the input-gradient reduction of the sublayer that reads the new stream overlaps
        `compute`'s backward."""
        out = compute(h)
        return h + self(pending), out


def ladder_step(h: torch.Tensor, pending: Optional[torch.Tensor], sublayer: Callable[[torch.Tensor], torch.Tensor],
                ladder: bool, sync: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sublayer in carry form: (h_{j-2}, f_{j-1}) -> (h_{j-1}, f_j), where f_j =
    sublayer(h_{j-2}) for a ladder sublayer (computed before f_{j-1} is needed) and
    sublayer(h_{j-1}) for a standard one. `pending` is None before the first sublayer."""
    if ladder:
        if pending is None:
            return h, sublayer(h)
        h, out = sync.add_after(h, pending, sublayer)
    else:
        if pending is not None:
            h = h + sync(pending)
        out = sublayer(h)
    return h, out

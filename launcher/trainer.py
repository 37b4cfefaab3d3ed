"""The training loop: build the mesh, the model (parallelized from outside), the optimizer and the
data loader; step, log, evaluate, checkpoint, and stop cleanly on SIGTERM.

`train(recipe)` runs inside an initialized process group (or initializes a one-process gloo/nccl
group itself) and returns a TrainResult, so tests run layouts in-process and compare losses.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from longtrain.data.loader import build_loader
from longtrain.kernels.chunked_loss import IGNORE_INDEX
from longtrain.launcher.checkpoint import CheckpointManager, check_residual_architecture, find_resume_dir, read_meta
from longtrain.launcher.config import Recipe, resolve_balance, resolve_degrees
from longtrain.launcher.log import LOGGER, setup_logging
from longtrain.launcher.metrics import MetricsLogger, device_peak_tflops, peak_memory_gb
from longtrain.launcher.supervisor import report_timing
from longtrain.models.sizes import describe_model, resolve_model_config
from longtrain.models.registry import build_model, kind_of
from longtrain.parallel.context.layout import shard_batch
from longtrain.parallel.mesh import Mesh, ParallelDims
from longtrain.parallel.parallelize import parallelize

# Besides norms and other vectors: Mamba's per-head dynamics are not decayed (as mamba-ssm does).
NO_DECAY = ("A_log", "dt_bias", ".D")



class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (train.on_nonfinite: stop); str() is one line."""


class _NonFiniteStep(Exception):
    """Raised by train_step before the optimizer step; the weights and optimizer are untouched."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"step {step}: loss {loss}, grad norm {grad_norm}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean token loss
    eval_losses: dict[int, float] = field(default_factory=dict)
    last_step: int = 0
    stopped_by_signal: bool = False
    run_dir: str = ""
    nonfinite: list = field(default_factory=list)  # (step, action) for every non-finite step met
    stop_checkpoint: str = ""  # the checkpoint saved when stopped by a signal


# ----------------------------------------------------------------------------------------------
# Process group and device
# ----------------------------------------------------------------------------------------------
def pick_device(recipe: Recipe) -> torch.device:
    want = recipe.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: cuda was asked for but no CUDA device is visible")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain one-process run
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    from datetime import timedelta

    # run.collective_timeout: a collective stuck longer fails (and the launcher prints all stacks)
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                            timeout=timedelta(seconds=timeout_s))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Optimizer, schedule, gradient clipping
# ----------------------------------------------------------------------------------------------
def build_optimizers(parts: list[nn.Module], recipe: Recipe, device: torch.device) -> list[torch.optim.Optimizer]:
    """One AdamW per model part (a pipeline rank may hold several stages). Weight decay applies to
    matrices, not to norms."""
    o = recipe.optim
    fused = fused_adamw(o.fused)
    optimizers = []
    for part in parts:
        named = [(n, p) for n, p in part.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(NO_DECAY)]
        no_decay = [p for n, p in named if p.ndim < 2 or n.endswith(NO_DECAY)]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if o.offload != "none":  # the same AdamW, its state in host memory (parallel/offload.py)
            from longtrain.parallel.offload import OffloadSettings, build_offload_optimizer

            settings = OffloadSettings(o.offload, o.offload_subgroup_size, o.offload_stride, o.offload_host_adam,
                                       o.offload_device_memory_gb)
            optimizers.append(build_offload_optimizer(groups, lr=o.lr, betas=o.betas, eps=o.eps, device=device,
                                                      settings=settings))
            continue
        optimizers.append(torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                            fused=fused or None, foreach=None if fused else True))
    return optimizers


def fused_adamw(choice: str) -> bool:
    """optim.fused: auto uses torch's fused AdamW on CPU and CUDA alike (the same update in one
    kernel per dtype/device group: 1.6x faster optimizer steps than foreach on the debug model on
    CPU, results equal to fp32 rounding, see tests/test_training.py)."""
    return choice != "off"


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then cosine or linear
    decay to min_lr_ratio x lr at the last step, or constant."""
    o, total = recipe.optim, recipe.train.steps
    if o.warmup_steps > 0 and step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    if o.schedule == "constant" or total <= o.warmup_steps:
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "linear":
        return floor + (o.lr - floor) * (1 - progress)
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def clip_grad_norm(parts: list[nn.Module], max_norm: float, pp_group) -> torch.Tensor:
    """Total gradient norm over every parameter of the model, whatever its layout: DTensor
    gradients are reduced over their own mesh, pipeline stages over the pp group. A device
    scalar (the host does not wait for it)."""
    params = [p for part in parts for p in part.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    by_layout: dict = {}      # layout -> parameters whose gradients share it
    for p in params:
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        by_layout.setdefault(key, []).append(p)
    device = _device_of(grads[0]) if grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for key, group in by_layout.items():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.float().to(device) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm > 0:
        # clip_grads_with_norm_ takes parameters and scales their .grad (handing it gradients scaled
        # nothing: a gradient's own .grad is None, and every run trained unclipped).
        for key, group in by_layout.items():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(_device_of(group[0].grad)), foreach=True)
    return total


def _device_of(t: torch.Tensor) -> torch.device:
    return t.to_local().device if isinstance(t, DTensor) else t.device


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        setup_logging()
        self.device = pick_device(recipe)
        init_distributed(self.device, recipe.run.collective_timeout)
        self.rank = dist.get_rank()
        degrees = resolve_degrees(recipe.parallel, dist.get_world_size())
        self.dims = ParallelDims(**degrees)
        self.mesh = Mesh(self.dims, self.device.type)
        self.tp_rank = self.mesh.local_rank("tp")
        self.run_dir = Path(recipe.run.dir)
        self.ckpt_root = Path(recipe.checkpoint.dir or self.run_dir / "checkpoints")

        # Same seed on every rank: every rank builds the same full model, then shards it.
        torch.manual_seed(recipe.train.seed)
        if recipe.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.model_cfg = resolve_model_config(recipe.model)
        model = self._build_model()
        self.parallel = parallelize(model, self.mesh, recipe.parallel, device=self.device, loss_fn=self._loss_fn,
                                    balance=resolve_balance(recipe.parallel, recipe.data.packing),
                                    cluster=recipe.cluster,
                                    contiguous_sequence=kind_of(self.model_cfg).contiguous_sequence)
        self.parts = self.parallel.parts
        self.loss_chunk_tokens, self.loss_path = self._pick_loss_path()
        if self._init_on_meta():
            self._materialize()
            if recipe.model.hf_checkpoint:
                self._load_hf_sharded(recipe.model.hf_checkpoint)
        self.optimizers = build_optimizers(self.parts, recipe, self.device)

        self.loader = self._build_loader("train")
        self._balance_window: list = []  # parallel.balance: step_balance of each step since the last log
        self.step = 0
        # Per-step values the host reads only when it logs (one reduction per log window):
        # (step, this rank's loss share, global token count, grad norm), all device tensors.
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.stop_requested = False  # set by SIGTERM on this rank
        self._stop_agreed = False  # some rank was asked to stop (agreed with the step's flags)
        self._skip_batches: set[int] = set()  # steps whose original batch is skipped after a rollback
        self._rollbacks: dict[int, int] = {}

    def _build_loader(self, split: str):
        """This rank's batches: its data rank's, or under parallel.balance its share of the balancing
        group's step (launcher/balanced_batches.py)."""
        recipe = self.recipe
        engine = self.parallel.balance_engine
        if engine is None:
            return build_loader(recipe.data, dp_rank=self.mesh.dp_rank, dp_degree=self.dims.dp,
                                seed=recipe.train.seed, split=split)
        from longtrain.launcher.balanced_batches import BalancedBatches

        # Unknown document lengths are learned by the whole world, not only by the balancing group: every
        # rank builds this loader here (parallel.balance is the recipe's), and tp peers read the same stream
        # and pack the same steps. pp is refused with balance; were it allowed, stages that read no data
        # would not build the loader: then the balancing group alone (None).
        world = list(range(dist.get_world_size())) if self.dims.pp == 1 else None
        return BalancedBatches(recipe, resolve_balance(recipe.parallel, recipe.data.packing), engine, self.mesh.local_rank("loss"),
                               self.dims.dp * self.dims.cp, self.dims.dp, self.model_cfg, self.dims.tp, split,
                               length_ranks=world)

    # -- model ------------------------------------------------------------------------------
    def _init_on_meta(self) -> bool:
        init = self.recipe.train.init_device
        return init == "meta" or (init == "auto" and self.model_cfg.num_params() > 1e9)

    def _build_model(self):
        """The full model on CPU, initialized from the recipe seed so that every layout starts
        from the same weights; or, for large models, on the meta device (no memory), to be
        materialized shard by shard after parallelization (see _materialize)."""
        cfg = self.model_cfg
        if self._init_on_meta():
            with torch.device("meta"):
                return build_model(cfg)
        with torch.device("cpu"):
            model = build_model(cfg)
        model.init_weights(seed=self.recipe.train.seed)
        if self.recipe.model.hf_checkpoint:
            if self.recipe.model.kind == "hybrid":
                from longtrain.models.hf_mamba import load_hf_mamba2

                _, state = load_hf_mamba2(self.recipe.model.hf_checkpoint)
                model.load_state_dict(state, strict=True)
            elif self.recipe.model.attention == "mla":
                from longtrain.models.hf_deepseek import load_into_mla_model

                load_into_mla_model(model, self.recipe.model.hf_checkpoint)
            else:
                from longtrain.models.hf import load_into_model

                load_into_model(model, self.recipe.model.hf_checkpoint)
        return model

    def _load_hf_sharded(self, path: str) -> None:
        """Rank 0 reads the Hugging Face checkpoint; every parameter shard is filled by broadcast,
        so no other rank ever holds the full model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from longtrain.models.hf import check_same_architecture, load_hf_checkpoint

        state = {}
        if self.rank == 0 and self.recipe.model.attention == "mla":
            from longtrain.models import hf_deepseek

            hf_cfg, state = hf_deepseek.load_hf_deepseek(path)
            hf_deepseek.check_same_architecture(self.model_cfg, hf_cfg, path)
        elif self.rank == 0:
            hf_cfg, state = load_hf_checkpoint(path)
            check_same_architecture(self.model_cfg, hf_cfg, path)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        for part in self.parts:
            set_model_state_dict(part, state, options=options)

    def _materialize(self) -> None:
        """Allocate meta-initialized parts on the device and initialize each shard. The seed
        depends on the mesh coordinates except dp_replicate, so HSDP replicas stay identical
        and different shards get different draws."""
        coords = [self.mesh.local_rank(axis) for axis in ("pp", "dp_shard", "cp", "tp")]
        shard_id = 0
        for axis, coord in zip(("pp", "dp_shard", "cp", "tp"), coords):
            shard_id = shard_id * getattr(self.dims, axis) + coord
        torch.manual_seed(self.recipe.train.seed + 1_000_003 * (shard_id + 1))
        for part in self.parts:
            part.to_empty(device=self.device)
            part.init_weights()
        torch.manual_seed(self.recipe.train.seed)

    @staticmethod
    def _loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed token cross-entropy (divided by the step's global token count by the caller, so
        that summing over micro-batches and data ranks gives the global mean)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def _pick_loss_path(self) -> tuple[int, str]:
        """train.loss_chunk_tokens, or 0 (the full logits) with the reason: under pp the schedule
        calls the last stage without the labels. Under tp the chunks run vocabulary-parallel
        (parallel/vocab_parallel_loss.py: chunk x vocab/tp logits a rank)."""
        chunk = self.recipe.train.loss_chunk_tokens
        if chunk == 0:
            return 0, "full logits (train.loss_chunk_tokens: 0)"
        if self.dims.pp > 1:
            return 0, "full logits: train.loss_chunk_tokens is not applied with parallel.pp > 1"
        if self.dims.tp > 1:
            return chunk, (f"chunked loss, vocabulary-parallel over tp={self.dims.tp}, {chunk} tokens a chunk "
                           f"(at most {chunk} x vocab/{self.dims.tp} logits a rank)")
        return chunk, f"chunked loss, {chunk} tokens a chunk (no full fp32 logits)"

    def _model_loss(self, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, meta: tuple,
                    token_count: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the step loss (its summed cross-entropy over the step's
        global token count): the model computes it chunk by chunk, or returns the full logits."""
        if self.loss_chunk_tokens:
            summed = model(tokens, *meta, labels=labels, loss_chunk_tokens=self.loss_chunk_tokens)
        else:
            summed = self._loss_fn(model(tokens, *meta), labels)
        return summed / token_count

    # -- state ------------------------------------------------------------------------------
    def state_dict_for_checkpoint(self) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        model_sd, optim_sd = {}, {}
        for part, opt in zip(self.parts, self.optimizers):
            model_sd.update(get_model_state_dict(part, options=opts))
            optim_sd.update(get_optimizer_state_dict(part, opt, options=opts))
        return {"model": model_sd, "optim": optim_sd}  # the trainer state goes to meta.json (JSON)

    def load_checkpoint_state(self, state: dict, meta: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
        for part, opt in zip(self.parts, self.optimizers):
            set_model_state_dict(part, state["model"], options=opts)
            set_optimizer_state_dict(part, opt, state["optim"], options=opts)
        self.step = int(meta["train"]["step"])
        self.loader.load_state_dict(meta["train"]["data"])

    def maybe_resume(self, logger=None) -> None:
        """Resume this run (the same model, refused otherwise), or else start from another run's
        weights when checkpoint.init_from is set (new optimizer, step 0, the data from the start).
        `logger`: anything with write(line); default the rank-0 log."""
        logger = logger or _Log()
        ckpt = find_resume_dir(self.ckpt_root, self.recipe.checkpoint.resume)
        if ckpt is None:
            if self.recipe.checkpoint.init_from:
                self._init_from(logger)
            return
        check_residual_architecture(read_meta(ckpt), self.model_cfg, ckpt)
        state = self.state_dict_for_checkpoint()
        meta = CheckpointManager.load(ckpt, state, model=self._model_fields())
        self.load_checkpoint_state(state, meta)
        logger.write(f"resumed from {ckpt} at step {self.step} (saved as {meta.get('layout', '?')})")

    def _model_fields(self) -> dict:
        from longtrain.launcher.checkpoint import model_fields

        return model_fields(self.recipe.model.kind, self.model_cfg)

    def _init_from(self, logger) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )

        source = find_resume_dir(".", self.recipe.checkpoint.init_from, key="checkpoint.init_from")
        check_residual_architecture(read_meta(source), self.model_cfg, source)  # ladder vs standard: `longtrain convert`
        state = {"model": {}}
        for part in self.parts:
            state["model"].update(get_model_state_dict(part))
        from longtrain.launcher.checkpoint import CheckpointError, read_dcp_metadata

        saved_keys = {k for k in read_dcp_metadata(source / ".metadata").state_dict_metadata if k.startswith("model.")}
        unused = sorted(saved_keys - {f"model.{k}" for k in state["model"]})
        if unused:
            raise CheckpointError(f"checkpoint.init_from: {source} holds weights this model has no place for "
                                  f"({unused[0]}{f' and {len(unused) - 1} more' if len(unused) > 1 else ''})")
        meta = CheckpointManager.load(source, state, restore_rng=False)
        for part in self.parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        saved, here = meta.get("model", {}), self._model_fields()
        changed = [f"{k} {saved.get(k)!r} -> {here.get(k)!r}" for k in sorted(here) if saved.get(k) != here.get(k)]
        logger.write(f"initialized the weights from {source} (step {meta.get('step')}); new optimizer, step 0"
                     + (f"; model changes: {', '.join(changed)}" if changed else ""))

    def save_checkpoint(self) -> Path:
        manager = CheckpointManager(self.ckpt_root, self.recipe.checkpoint.keep)
        meta = {"layout": self.dims.describe(), "degrees": vars(self.dims), "model": self._model_fields(),
                "train": {"step": self.step, "data": self.loader.state_dict()}}
        started = time.perf_counter()
        path = manager.save(self.step, self.state_dict_for_checkpoint(), meta)
        report_timing("save", time.perf_counter() - started)  # sizes the launcher's SIGTERM grace
        return path

    # -- one step -----------------------------------------------------------------------------
    def _global_token_count(self, labels: torch.Tensor) -> torch.Tensor:
        """Tokens in the loss over the whole step (every data and context rank), on the device."""
        count = (labels != IGNORE_INDEX).sum().to(torch.float64)
        dist.all_reduce(count, group=self.mesh["loss"].get_group())
        return count.float()

    def _local_batch(self, batch: dict) -> dict:
        """This rank's part of the data rank's batch, on the device: the whole rows, or under
        context parallelism the cp shard in the layout the attention mode needs (padding inside
        never reaches the loss)."""
        strategy = self.parallel.cp_strategy
        if self.recipe.data.packing == "none":
            batch = {k: v for k, v in batch.items() if k != "doc_ids"}
        if strategy is not None:
            batch = shard_batch(batch, strategy.shape, strategy.cp_rank)
        out = {k: batch[k].to(self.device) for k in ("tokens", "labels", "positions")}
        # Fixed windows (packing: none) span the row: no document mask, the fused causal path.
        packed = self.recipe.data.packing != "none" and batch.get("doc_ids") is not None
        out["doc_ids"] = batch["doc_ids"].to(self.device) if packed else None
        return out

    def _meta(self, local: dict) -> tuple:
        """Per-token inputs every layer needs beside the hidden states."""
        return (local["positions"],) if local["doc_ids"] is None else (local["positions"], local["doc_ids"])

    def train_step(self, batch: dict) -> None:
        """One optimizer step. The host waits once, for the flag that says whether the step's loss
        and gradient norm are finite (and whether any rank was asked to stop): the token count,
        the loss and the norm stay on the device until a log step reads them (_flush_losses)."""
        local_batch = self._local_batch(batch)
        tokens, labels = local_batch["tokens"], local_batch["labels"]
        meta = self._meta(local_batch)
        token_count = self._global_token_count(labels)
        lr = lr_at(self.step + 1, self.recipe)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

        if self.parallel.pipeline is not None:
            local = self.parallel.pipeline.step(tokens, labels, meta, token_count)
            holds_loss = local is not None
        else:
            model = self.parts[0]
            accum = self.recipe.train.grad_accum
            local = torch.zeros((), device=self.device)
            micro = zip(tokens.chunk(accum), labels.chunk(accum), *(m.chunk(accum) for m in meta))
            for i, (tok, lab, *micro_meta) in enumerate(micro):
                self.parallel.set_gradient_sync(i == accum - 1)
                with self.parallel.autocast():
                    loss = self._model_loss(model, tok, lab, tuple(micro_meta), token_count)
                loss.backward()
                local += loss.detach()
            holds_loss = True
        self.parallel.finish_gradients()

        if self.recipe.optim.offload != "none":  # gradients of host subgroups live on the host
            from longtrain.parallel.offload import clip_offloaded_grad_norm

            grad_norm = torch.as_tensor(clip_offloaded_grad_norm(self.parts, self.optimizers,
                                                                 self.recipe.train.grad_clip,
                                                                 self.parallel.pp_group, self.device))
        else:
            grad_norm = clip_grad_norm(self.parts, self.recipe.train.grad_clip, self.parallel.pp_group)
        share = self._loss_share(local if holds_loss else None)
        # Checked before the optimizer step (and so before any save): a non-finite step changes
        # nothing. The one host wait of the step; the stop request rides along.
        flags = torch.stack([(~torch.isfinite(share) | ~torch.isfinite(grad_norm.to(share.device))).float(),
                             torch.tensor(float(self.stop_requested), device=share.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop = flags.tolist()
        self._stop_agreed = bool(stop)
        if bad:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            loss_value = self._reduce_shares([share])[0]
            raise _NonFiniteStep(self.step + 1, loss_value, float(grad_norm))
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.last_grad_norm = grad_norm  # the step's (pre-clip) norm, a device scalar
        self._pending.append((self.step, share, token_count, grad_norm))

    def train_step_and_read(self, batch: dict) -> tuple[float, float]:
        """train_step, then the host reads the step's loss and gradient norm (benchmarks)."""
        self.train_step(batch)
        loss, grad_norm, _ = self._flush_losses(TrainResult())
        return loss, grad_norm

    def _on_nonfinite(self, bad: _NonFiniteStep, result: TrainResult, logger) -> None:
        """train.on_nonfinite: stop (raise), skip_step (the step counts, its batch is dropped,
        no update) or rollback (reload the last checkpoint, drop the offending batch)."""
        action = self.recipe.train.on_nonfinite
        what = f"non-finite {'loss' if not math.isfinite(bad.loss) else 'gradient norm'} at step {bad.step} " \
               f"(loss {bad.loss}, grad norm {bad.grad_norm})"
        result.nonfinite.append((bad.step, action))
        if action == "skip_step":
            self.step += 1
            logger.write(f"{what}: step skipped, no update (train.on_nonfinite: skip_step)")
            return
        if action == "rollback":
            if self._rollbacks.get(bad.step, 0) >= 1:
                raise NonFiniteError(f"{what} again after rolling back and skipping its batch; stopping "
                                     f"(the last checkpoint in {self.ckpt_root} is unchanged)")
            ckpt = find_resume_dir(self.ckpt_root, "auto")
            if ckpt is None:
                raise NonFiniteError(f"{what}; train.on_nonfinite: rollback found no checkpoint in {self.ckpt_root} "
                                     "to roll back to (set checkpoint.every)")
            self._rollbacks[bad.step] = self._rollbacks.get(bad.step, 0) + 1
            state = self.state_dict_for_checkpoint()
            meta = CheckpointManager.load(ckpt, state)
            self.load_checkpoint_state(state, meta)
            self._skip_batches.add(bad.step)
            logger.write(f"{what}: rolled back to {ckpt} (step {self.step}); step {bad.step}'s batch will be skipped")
            return
        raise NonFiniteError(f"{what}; nothing of this step was applied or saved (the last checkpoint in "
                             f"{self.ckpt_root} is unchanged); train.on_nonfinite: skip_step or rollback go past it")

    def _next_batch(self) -> dict:
        batch = next(self.loader)
        if self.step + 1 in self._skip_batches:  # this step's batch made the loss or gradients non-finite
            self._skip_batches.discard(self.step + 1)
            batch = next(self.loader)
        if getattr(self.loader, "last_plan", None) is not None:  # parallel.balance: the step trained
            from longtrain.launcher.balanced_batches import step_balance

            self._balance_window.append(step_balance(self.loader.last_plan, self.loader.last_layout))
        return batch

    def _balance_metrics(self) -> dict:
        """parallel.balance: the balance of the log window's steps (balanced_batches.window_balance);
        starts the next window."""
        from longtrain.launcher.balanced_batches import window_balance

        steps, self._balance_window = self._balance_window, []
        return window_balance(steps)

    def _loss_share(self, local: torch.Tensor | None) -> torch.Tensor:
        """This rank's share of the global mean token loss: each data/cp rank's loss counted once
        (by one tp rank, the rank holding the last pipeline stage); zero elsewhere. On the device."""
        counts = local is not None and self.tp_rank == 0
        return local.detach().float().reshape(()) if counts else torch.zeros((), device=self.device)

    def _reduce_shares(self, shares: list[torch.Tensor]) -> list[float]:
        """Global mean token losses of several steps from every rank's shares: one all-reduce."""
        value = torch.stack(shares).to(torch.float64)
        dist.all_reduce(value)
        return value.tolist()

    def _flush_losses(self, result: TrainResult) -> tuple[float, float, float]:
        """Read the pending steps' losses into result.losses (one reduction for all of them);
        returns (last loss, last grad norm, tokens trained in the window)."""
        if not self._pending:
            return float("nan"), float("nan"), 0.0
        steps, shares, counts, norms = zip(*self._pending)
        losses = self._reduce_shares(list(shares))
        result.losses.update(zip(steps, losses))
        tokens = float(torch.stack(list(counts)).sum())
        last_norm = float(norms[-1])
        self._pending.clear()
        return losses[-1], last_norm, tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        loader = self._build_loader("eval")
        total = 0.0
        for part in self.parts:
            part.eval()
        for _ in range(self.recipe.data.eval_batches):
            local_batch = self._local_batch(next(loader))
            tokens, labels, meta = local_batch["tokens"], local_batch["labels"], self._meta(local_batch)
            token_count = self._global_token_count(labels) * self.recipe.data.eval_batches
            if self.parallel.pipeline is not None:
                local = self.parallel.pipeline.forward_only(tokens, labels, meta, token_count)
            else:
                with self.parallel.autocast():
                    local = self._model_loss(self.parts[0], tokens, labels, meta, token_count)
            total += self._reduce_shares([self._loss_share(local)])[0]
        for part in self.parts:
            part.train()
        return total

    # -- run ------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train to train.steps. `stop_after` stops after that step exactly as a SIGTERM would
        (checkpoint, then return), for time-boxed jobs and tests of resume."""
        recipe, result = self.recipe, TrainResult(run_dir=str(self.run_dir))
        is_writer = self.rank == 0
        lock = self._lock_run_dir()
        try:
            return self._run(recipe, result, is_writer, stop_after)
        finally:
            if lock is not None:
                lock.release()

    def _lock_run_dir(self):
        """Rank 0 holds the run.dir lock (unless the local launcher holds it for the job); every
        rank fails together, in one line naming the holder, when another run has it."""
        from longtrain.launcher.run_lock import HELD_ENV, RunDirLocked, RunLock

        lock, message = None, ""
        if self.rank == 0 and not os.environ.get(HELD_ENV):
            try:
                lock = RunLock(self.run_dir).acquire()
            except RunDirLocked as err:
                message = str(err)
        box = [message]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise RunDirLocked(box[0])
        return lock

    def _run(self, recipe: Recipe, result: TrainResult, is_writer: bool, stop_after: int | None) -> TrainResult:
        if is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        self.maybe_resume()
        logger = MetricsLogger(self.run_dir, is_writer=is_writer, total_steps=recipe.train.steps,
                               start_step=self.step, tensorboard=recipe.run.tensorboard, progress=recipe.run.progress)
        logger.write(f"longtrain: {self.model_cfg.num_params() / 1e6:.1f}M parameters, layout "
                     f"{self.dims.describe()} on {dist.get_world_size()} x {self.device.type}, "
                     f"{recipe.train.steps} steps")
        logger.write(f"longtrain: model {describe_model(recipe.model, self.model_cfg)}")
        logger.write(f"longtrain: loss: {self.loss_path}")
        if getattr(self.loader, "strategy", None) is not None:  # parallel.balance
            from longtrain.parallel.balance.remap import REMAP_SETTINGS

            logger.write(f"longtrain: balance {self.loader.strategy}: each step's sequences planned over the "
                         f"{self.loader.world} data x context ranks, remapping "
                         f"{REMAP_SETTINGS[self.loader.remap]}")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        peak = device_peak_tflops(self.device, recipe.run.peak_tflops)
        flops_per_token = self.model_cfg.flops_per_token(recipe.data.seq_len)
        window_start = time.perf_counter()
        try:
            while self.step < recipe.train.steps:
                step_started = time.perf_counter()
                try:
                    self.train_step(self._next_batch())
                    report_timing("step", time.perf_counter() - step_started)
                    stepped = True
                except _NonFiniteStep as bad:
                    self._flush_losses(result)  # the steps before it keep their losses
                    before = self.step
                    self._on_nonfinite(bad, result, logger)
                    if self.step <= before:  # rolled back: continue from the checkpoint's step
                        window_start = time.perf_counter()
                        continue
                    stepped = False
                logger.advance(self.step)
                if stepped and (self.step % recipe.train.log_every == 0 or self.step == recipe.train.steps):
                    loss, grad_norm, window_tokens = self._flush_losses(result)  # the host reads the window
                    logger.advance(self.step, loss)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_start
                    tps = window_tokens / elapsed  # trained tokens of the window's steps (all data ranks)
                    tflops = tps * flops_per_token / dist.get_world_size() / 1e12
                    record = {"step": self.step, "loss": loss, "lr": lr_at(self.step, recipe),
                              "grad_norm": grad_norm, "tokens_per_second": tps, "tflops_per_device": tflops,
                              "mfu": tflops / peak if peak else None, "peak_memory_gb": peak_memory_gb(self.device),
                              **self._offload_metrics(), **self._balance_metrics()}
                    skipped = self._skipped_records()
                    if skipped is not None:
                        record["skipped_records"] = skipped
                    logger.log(record)
                    window_start = time.perf_counter()
                if recipe.train.eval_every and self.step % recipe.train.eval_every == 0:
                    self._flush_losses(result)
                    eval_loss = self.evaluate()
                    result.eval_losses[self.step] = eval_loss
                    logger.log({"step": self.step, "eval_loss": eval_loss})
                    window_start = time.perf_counter()
                if recipe.checkpoint.every and self.step % recipe.checkpoint.every == 0 \
                        and self.step < recipe.train.steps:
                    self._flush_losses(result)
                    logger.write(f"checkpoint saved: {self.save_checkpoint()}")
                    window_start = time.perf_counter()
                # A SIGTERM on any rank was agreed in the step's flags; stop_after is the same on every rank.
                if self._stop_agreed or (stop_after is not None and self.step >= stop_after):
                    result.stopped_by_signal = True
                    logger.write(f"stopping: saving a checkpoint at step {self.step} and exiting")
                    break
            self._flush_losses(result)
            if recipe.checkpoint.save_at_end or result.stopped_by_signal:
                saved = self.save_checkpoint()
                logger.write(f"checkpoint saved: {saved}")
                if result.stopped_by_signal:
                    result.stop_checkpoint = str(saved)
            skipped = self._skipped_records()
            if skipped:
                logger.write(f"skipped {skipped} bad records in all (data.skip_bad_records)")
        finally:
            logger.close()
            if hasattr(self.loader, "close"):
                self.loader.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        result.last_step = self.step
        return result

    def _offload_metrics(self) -> dict:
        """Offloaded optimizer: predicted and measured update seconds of the step."""
        if self.recipe.optim.offload == "none":
            return {}
        from longtrain.parallel.offload import offload_metrics

        return offload_metrics(self.optimizers)

    def _skipped_records(self) -> int | None:
        """Bad records skipped so far by all data ranks (None unless data.skip_bad_records)."""
        if not self.recipe.data.skip_bad_records:
            return None
        stats = getattr(self.loader, "stats", {})
        first_of_data_rank = all(self.mesh.local_rank(axis) == 0 for axis in ("tp", "cp", "pp"))
        count = torch.tensor(float(stats.get("skipped_records", 0)) if first_of_data_rank else 0.0, device=self.device)
        dist.all_reduce(count)
        return int(count.item())

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True


class _Log:
    """write(line) onto the rank-0 log, for the methods that take a logger."""

    def write(self, line: str) -> None:
        LOGGER.info(line)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(recipe: Recipe) -> TrainResult:
    return Trainer(recipe).run()

"""Console output of a job: Python logging under the `longtrain` logger, shown by rank 0 only.

Nothing is configured at import: `setup_logging()` (called when a Trainer starts) attaches one
handler to the `longtrain` logger that lets only rank 0's records through and writes them with
tqdm.write, so lines never tear the progress bar. Modules log with logging.getLogger(__name__)
(names under `longtrain.`) and reach the same handler.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER = logging.getLogger("longtrain")


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class RankZeroFilter(logging.Filter):
    """Only rank 0 speaks; every rank still measures and checks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0


class _ProgressAwareHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # pragma: no cover - a closed stream at exit
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Attach the rank-0 handler once (idempotent); quiet the warnings a training run expects."""
    if not any(isinstance(h, _ProgressAwareHandler) for h in LOGGER.handlers):
        handler = _ProgressAwareHandler()
        handler.addFilter(RankZeroFilter())
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(level)
    quiet_expected_warnings()


def quiet_expected_warnings() -> None:
    """Messages that are expected in a correct run and would otherwise print once per rank."""
    # DTensor warns that a 2D (fsdp, tp) gradient norm takes two all-reduces: expected for the norm
    # of a 2D-sharded model.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    # Tensor-parallel outputs (DTensor.to_local) are views; nothing here modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

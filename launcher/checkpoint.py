"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout of `checkpoint.dir`:

    step_00000010/        one completed checkpoint: DCP shards + .metadata, rng/, meta.json
    step_00000020/
    latest                the name of the newest completed checkpoint (replaced atomically)

A save writes into `.tmp_step_N/`, writes meta.json last, renames the directory into place and
only then points `latest` at it; the oldest checkpoints beyond `keep` are deleted afterwards. A
save that dies midway leaves a `.tmp_*` directory and the previous checkpoint and `latest`
untouched. Model and optimizer states are saved with fully qualified parameter names (DTensor
shards included), so a checkpoint loads under another parallel layout; the data cursor is global.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

LATEST = "latest"
META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint problem; str() is one line naming the directory."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _completed(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / META).is_file())


def find_resume_dir(root: str | Path, resume: str) -> Path | None:
    """Which checkpoint to resume from, or None to start fresh. Raises CheckpointError for a
    path that does not exist, a save that never completed, or a directory that holds
    checkpoints but no `latest` (starting fresh there could overwrite them)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume: {path} does not exist")
        if (path / LATEST).is_file():
            return _read_latest(path)
        if (path / META).is_file():
            return path
        if path.name.startswith((".tmp_", "step_")) or (path / ".metadata").is_file():
            raise CheckpointError(f"checkpoint.resume: {path}: this checkpoint's save never completed (no {META})")
        raise CheckpointError(f"checkpoint.resume: {path} has no completed checkpoint (no '{LATEST}' file)")
    root = Path(root)
    if (root / LATEST).is_file():
        return _read_latest(root)
    done = _completed(root)
    if done:
        raise CheckpointError(
            f"checkpoint.dir: {root} holds checkpoints ({done[-1].name}, ...) but no '{LATEST}' file; "
            f"set checkpoint.resume to one of them, or use another checkpoint.dir")
    return None


def _read_latest(root: Path) -> Path:
    name = (root / LATEST).read_text().strip()
    target = root / name
    if not name or not (target / META).is_file():
        raise CheckpointError(f"checkpoint: {root / LATEST} points at {name!r}, which is not a completed checkpoint")
    return target


def read_meta(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / META).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint: {ckpt_dir / META}: unreadable ({err})") from None


def check_residual_architecture(meta: dict, model_cfg, ckpt_dir: Path) -> None:
    """A ladder model's weights do not fit a standard model (or other ladder layers): the same
    tensors compute another function. Checkpoints saved before the flag existed are standard."""
    def ladder_layers(cfg: dict) -> int:  # how many of the last layers are ladder layers
        if cfg.get("residual", "standard") != "ladder":
            return 0
        k = cfg.get("ladder_layers")
        return model_cfg.n_layers if k is None else k

    saved = ladder_layers(meta.get("model") or {})
    wanted = ladder_layers({"residual": model_cfg.residual, "ladder_layers": model_cfg.ladder_layers})
    if saved != wanted:
        def name(k):
            return "standard" if k == 0 else f"ladder (last {k} layers)"

        raise CheckpointError(f"checkpoint: {ckpt_dir} holds a {name(saved)} model but model.residual/"
                              f"model.ladder_layers ask for a {name(wanted)} one")


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, state: dict, meta: dict) -> Path:
        """Collective: every rank calls it with its shards of `state` (tensors, DTensors and
        plain values). `meta` is written by rank 0."""
        rank = dist.get_rank()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # a save of this step that died earlier
        dist.barrier()
        started = time.perf_counter()
        dcp.save(state, checkpoint_id=str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        dist.barrier()
        if rank == 0:
            meta = dict(meta, step=step, format_version=FORMAT_VERSION, world_size=dist.get_world_size(),
                        saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"), save_seconds=time.perf_counter() - started)
            (tmp / META).write_text(json.dumps(meta, indent=2))
            if final.exists():  # the same step saved before: swap only once the new one is complete
                old = self.root / f".old_{final.name}"
                if old.exists():
                    shutil.rmtree(old)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            pointer = self.root / f".{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / LATEST)
            for stale in _completed(self.root)[:-self.keep]:
                if stale != final:
                    shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        return final

    @staticmethod
    def load(ckpt_dir: Path, state: dict) -> dict:
        """Collective: fills `state` in place from `ckpt_dir` (resharding to this layout) and
        restores this rank's RNG when the checkpoint had the same world size. Returns meta."""
        meta = read_meta(ckpt_dir)
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint: {ckpt_dir}: format version {meta.get('format_version')} "
                                  f"is not {FORMAT_VERSION}")
        try:
            dcp.load(state, checkpoint_id=str(ckpt_dir))
        except Exception as err:  # DCP wraps per-rank failures; keep the first line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"checkpoint: {ckpt_dir}: could not load into this model ({first})") from err
        rng_file = ckpt_dir / "rng" / f"rank_{dist.get_rank():05d}.pt"
        if meta.get("world_size") == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return meta


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

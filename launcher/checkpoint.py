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

Loading a checkpoint runs no code from it: checkpoints travel between people and clusters. The
trainer state (step, data cursor) lives in meta.json; each rank's RNG state is a file of tensors
read with torch.load(weights_only=True); DCP's `.metadata` is read through an unpickler that admits
only DCP's own metadata types (`_MetadataUnpickler`), and DCP's non-tensor entries (optimizer
hyperparameters) with weights_only=True. Every failure to save or load is a CheckpointError whose
message is one line naming the file and the cause.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import json
import os
import pathlib
import pickle
import shutil
import time
from torch.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element

LATEST = "latest"
META = "meta.json"
FORMAT_VERSION = 3
# What each version changed, named when an older checkpoint is refused.
FORMAT_CHANGES = {
    2: "trainer state in meta.json, RNG as plain tensors (nothing unpickled)",
    3: "attention Q/K/V projections fused into one attention.wqkv (rows grouped per KV head), "
       "replacing attention.wq/wk/wv",
}


class CheckpointError(RuntimeError):
    """A checkpoint problem; str() is one line naming the directory."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _completed(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / META).is_file())


def find_resume_dir(root: str | Path, resume: str, key: str = "checkpoint.resume") -> Path | None:
    """Which checkpoint to resume from, or None to start fresh. Raises CheckpointError for a
    path that does not exist, a save that never completed, or a directory that holds
    checkpoints but no `latest` (starting fresh there could overwrite them)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"{key}: {path} does not exist")
        if (path / LATEST).is_file():
            return _read_latest(path)
        if (path / META).is_file():
            return path
        if path.name.startswith((".tmp_", "step_")) or (path / ".metadata").is_file():
            raise CheckpointError(f"{key}: {path}: this checkpoint's save never completed (no {META})")
        raise CheckpointError(f"{key}: {path} has no completed checkpoint (no '{LATEST}' file)")
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


# Model fields that only shape the initialization or the computation's blocking, not the model a
# checkpoint holds: they may change on resume.
NOT_THE_MODEL = ("init_std", "dt_min", "dt_max", "dt_init_floor", "chunk_size")


def model_fields(kind: str, cfg) -> dict:
    """The model config as meta.json stores it (JSON types), with its kind."""
    return json.loads(json.dumps({"kind": kind, **dataclasses.asdict(cfg)}))  # nested configs too (MLA's)


def check_same_model(ckpt_dir: Path, meta: dict, current: dict) -> None:
    """Refuse to resume into another model, in one line naming the first differing field."""
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint: {ckpt_dir / META}: holds no model config to compare with")
    for key in sorted(set(saved) | set(current), key=lambda k: (k != "kind", k)):
        if key in NOT_THE_MODEL:
            continue
        there, here = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if there != here:
            if isinstance(there, dict) and isinstance(here, dict):
                sub = next(k for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k))
                key, there, here = f"{key}.{sub}", there.get(sub, "(absent)"), here.get(sub, "(absent)")
            raise CheckpointError(
                f"checkpoint: {ckpt_dir} holds another model: model.{key} is {there!r} there, {here!r} in this "
                f"recipe; resume needs the same model (to start from its weights on purpose, e.g. a new "
                f"rope_theta, set checkpoint.init_from={ckpt_dir} and a new checkpoint.dir)")


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, state: dict, meta: dict) -> Path:
        """Collective: every rank calls it with its shards of `state` (tensors, DTensors and
        plain numbers); `meta` (JSON: the trainer state, the model config) is written by rank 0.
        A failure on any rank raises CheckpointError on every rank, one line naming the cause
        (for a full disk, how much the save needs), with the temporary directory removed."""
        rank = dist.get_rank()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        needed = _state_bytes(state)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # a save of this step that died earlier
        dist.barrier()
        started = time.perf_counter()
        error = None
        try:
            dcp.save(state, checkpoint_id=str(tmp))
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            error = err
        # Every rank learns whether any rank failed, so that all of them stop together.
        failed = torch.tensor(0.0 if error is None else 1.0)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_save_error(tmp, error, needed, self.root)) from None
        if rank == 0:
            meta = dict(meta, step=step, format_version=FORMAT_VERSION, world_size=dist.get_world_size(),
                        saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"), save_seconds=time.perf_counter() - started)
            try:
                (tmp / META).write_text(json.dumps(meta, indent=2))
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(_save_error(tmp, err, needed, self.root)) from None
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
    def load(ckpt_dir: Path, state: dict, restore_rng: bool = True, model: dict | None = None) -> dict:
        """Collective: fills `state` in place from `ckpt_dir` (resharding to this layout) and
        restores this rank's RNG when the checkpoint had the same world size. Returns meta.
        Nothing in the checkpoint is executed (see the module docstring)."""
        meta = read_meta(ckpt_dir)
        if meta.get("format_version") != FORMAT_VERSION:
            found = meta.get("format_version")
            newer = [f"{v}: {FORMAT_CHANGES[v]}" for v in sorted(FORMAT_CHANGES)
                     if isinstance(found, int) and found < v <= FORMAT_VERSION]
            why = f"; changed since: {'; '.join(newer)}" if newer else ""
            raise CheckpointError(f"checkpoint: {ckpt_dir}: format version {found} is not {FORMAT_VERSION} "
                                  f"(written by another version of longtrain{why})")
        if model is not None:
            check_same_model(ckpt_dir, meta, model)
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(ckpt_dir), planner=SafeLoadPlanner())
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            cause = _root_cause(err)
            if isinstance(cause, CheckpointError):  # a file at fault, already named
                raise CheckpointError(str(cause)) from None
            raise CheckpointError(f"checkpoint: {ckpt_dir}: could not load into this model "
                                  f"({_one_line(err)})") from None
        rng_file = ckpt_dir / "rng" / f"rank_{dist.get_rank():05d}.pt"
        if restore_rng and meta.get("world_size") == dist.get_world_size() and rng_file.is_file():
            try:
                rng = torch.load(rng_file, weights_only=True)
                _set_rng_state(rng)
            except Exception as err:  # noqa: BLE001 - any unreadable or forged file is one line
                raise CheckpointError(f"checkpoint: {rng_file}: unreadable RNG state ({_one_line(err)})") from None
        return meta


# ----------------------------------------------------------------------------------------------
# Reading without running code from the checkpoint
# ----------------------------------------------------------------------------------------------
def _allowed_metadata_globals() -> dict:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("torch.distributed.checkpoint.metadata", name): getattr(metadata, name)
               for name in ("Metadata", "MetadataIndex", "BytesStorageMetadata", "ChunkStorageMetadata",
                            "TensorProperties", "TensorStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name -> torch.layout
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle; this unpickler builds only DCP's metadata types, torch.Size,
    dtypes and layouts. Anything else (os.system, builtins.eval, ...) is refused before it runs."""
    _allowed: dict = {}

    def find_class(self, module: str, name: str):
        if not self._allowed:
            type(self)._allowed = _allowed_metadata_globals()
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (not a checkpoint metadata type)")


def read_dcp_metadata(path: Path):
    """Parse a DCP `.metadata` file without executing anything from it."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {path}: missing") from None
    except Exception as err:  # noqa: BLE001 - truncated, garbage or forged
        raise CheckpointError(f"checkpoint: {path}: unreadable ({_one_line(err)})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint: {path}: not DCP metadata (a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata goes through _MetadataUnpickler, whose shard paths must
    stay inside the checkpoint directory, and whose read errors name the shard file."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        for info in (metadata.storage_data or {}).values():
            rel = str(getattr(info, "relative_path", ""))
            if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
                raise CheckpointError(f"checkpoint: {self.path}/.metadata: shard path {rel!r} leaves the checkpoint")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        per_file: dict = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in per_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except CheckpointError:
                raise
            except Exception as err:  # noqa: BLE001 - truncated or garbage shard
                raise CheckpointError(f"checkpoint: {Path(self.path) / relative_path}: unreadable shard "
                                      f"({_one_line(err)})") from None
        fut: Future = Future()
        fut.set_result(None)
        return fut


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner unpickles DCP's non-tensor entries with weights_only=False; here they
    are read with weights_only=True (numbers, strings, tuples: the optimizer's hyperparameters)."""

    def load_bytes(self, read_item, value) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint: entry {read_item.dest_index.fqn}: refused ({_one_line(err)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ----------------------------------------------------------------------------------------------
# Errors as one line
# ----------------------------------------------------------------------------------------------
def _root_cause(err: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return _root_cause(inner)
    return err


def _one_line(err: BaseException) -> str:
    cause = _root_cause(err)
    if isinstance(cause, CheckpointError):
        return str(cause)
    text = " ".join(str(cause).split())
    if len(text) > 240:
        text = text[:237] + "..."
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def _is_disk_full(err: BaseException | None, free: int, needed: int) -> bool:
    cause = _root_cause(err) if err is not None else None
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        if "No space left" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    # torch's zip writer reports a short write as "unexpected pos N vs M"
    return err is not None and free < needed


def _save_error(tmp: Path, err: BaseException | None, needed: int, root: Path) -> str:
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = -1
    if err is None:
        return f"checkpoint: saving {tmp.name} failed on another rank (see its output); nothing was written"
    if _is_disk_full(err, free if free >= 0 else needed, needed):
        return (f"checkpoint: no space left on device saving to {root}: the checkpoint needs about "
                f"{_human(needed)}, {_human(max(free, 0))} free; the partial save was removed")
    return f"checkpoint: saving {tmp} failed ({_one_line(err)}); the partial save was removed"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _state_bytes(state) -> int:
    """Bytes the whole checkpoint takes (every rank's local shards, summed over ranks)."""
    from torch.distributed.tensor import DTensor

    local = 0
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, DTensor):
            local += node.to_local().numel() * node.element_size()
        elif isinstance(node, torch.Tensor):
            local += node.numel() * node.element_size()
    total = torch.tensor(float(local), dtype=torch.float64)
    dist.all_reduce(total)
    return int(total)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state) -> None:
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        raise ValueError(f"expected {{'cpu': tensor, ...}}, got {type(state).__name__}")
    torch.set_rng_state(state["cpu"])
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

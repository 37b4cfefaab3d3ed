"""Recipes: YAML with `base:` inheritance and dotted command-line overrides, into typed dataclasses.

Each section lives with its owner: `model` in models/config.py, `parallel` and `cluster` in
parallel/config.py, `data` in data/config.py; `optim`, `train`, `checkpoint` and `run` here. This
module loads YAML, applies `base:` and overrides, coerces values to the fields' types and runs the
checks that span sections. Every problem is a `RecipeError` whose message is one line naming the
file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from longtrain.data.config import DataConfig
from longtrain.models.config import ModelConfig
from longtrain.models.transformer import RopeScaling
from longtrain.parallel.offload import HostAdam, OffloadMode
from longtrain.parallel.config import (
    ClusterConfig,
    DegreesError,
    ParallelConfig,
    pp_microbatches,
    resolve_balance,
)
from longtrain.parallel.config import resolve_degrees as _resolve_degrees

__all__ = ["ClusterConfig", "DataConfig", "ModelConfig", "ParallelConfig", "Recipe", "RecipeError", "load_recipe",
           "pp_microbatches", "resolve_balance", "resolve_degrees", "validate_recipe"]


class RecipeError(ValueError):
    """A recipe problem; str() is the one line shown to the user."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"  # the optimizer (AdamW; decoupled weight decay on matrices only)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule decays to min_lr_ratio x lr at the last step
    weight_decay: float = 0.1  # AdamW weight decay (matrices; not norms, biases or Mamba dynamics)
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 10  # linear warmup steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    fused: Literal["auto", "on", "off"] = "auto"  # fused AdamW kernel (auto: on, CPU and CUDA; off: foreach)
    # Optimizer offloading (parallel/offload.py): none; cpu (fp32 master, m, v of each rank's
    # shard in host memory, every subgroup updated by the CPU); interleaved (every stride-th
    # subgroup prefetched and updated on the device while the CPU updates the others).
    offload: Literal["none", OffloadMode] = "none"
    # Parameters per subgroup of each rank's shard; auto: the performance model picks the size
    # (jointly with the stride) within the device memory budget.
    offload_subgroup_size: str = "auto"
    offload_stride: str = "auto"  # interleaved: auto (the performance model picks) or k >= 1
    offload_host_adam: HostAdam = "auto"  # auto: the faster, measured
    offload_device_memory_gb: float = 0.0  # device buffer budget for interleaved; 0: what is free


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps to train
    seed: int = 0  # seed of the initial weights and the data order
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size must divide by it)
    log_every: int = 10  # steps between metric lines (and the host reading the loss)
    eval_every: int = 0  # 0: never
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when visible, else CPU
    init_device: Literal["auto", "cpu", "meta"] = "auto"  # auto: meta (sharded materialization) above 1B parameters
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower; bitwise repeatable runs)
    # A non-finite loss or gradient norm is caught before the optimizer step (nothing applied or
    # saved): stop the run, skip_step (count the step, drop its batch, no update), or rollback
    # (reload the last checkpoint and skip the offending batch; a second failure there stops).
    on_nonfinite: Literal["stop", "skip_step", "rollback"] = "stop"
    # The loss in chunks of this many tokens (kernels/chunked_loss.py): the output head and the
    # cross-entropy run chunk by chunk and the full (tokens x vocab) fp32 logits never exist;
    # 0: the full logits. 1024 keeps one chunk's fp32 logits at 512 MiB for a 128K vocabulary
    # while each chunk's matmul stays large. Vocabulary-parallel under tp; the full logits under pp.
    loss_chunk_tokens: int = 1024


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run.dir>/checkpoints
    every: int = 0  # 0: only at the end of training (and on SIGTERM)
    keep: int = 2  # checkpoints kept (older ones deleted after a newer one is complete)
    resume: str = "auto"  # auto | never | a path to a checkpoint directory
    # Start a new run from another run's weights (a checkpoint directory or its parent with
    # `latest`): weights only, a new optimizer, step 0, data from the start. For deliberate model
    # changes (a new rope_theta for long-context extension), which resume refuses. Ignored once
    # this run has checkpoints of its own (they are resumed).
    init_from: Optional[str] = None
    save_at_end: bool = True  # save when training finishes


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1  # worker processes per node (GPUs per node)
    nnodes: int = 1  # nodes of the job
    master_port: int = 0  # 0: pick a free port for local launches
    # Local launches: restart all workers this many times after a failure; they resume from the
    # last checkpoint (checkpoint.resume: auto).
    max_restarts: int = 0
    # Seconds the workers get after SIGTERM to finish their step and save before they are killed
    # (0: the slowest step plus twice the longest save measured in this job, plus 10 s, at least 30 s).
    sigterm_grace_s: float = 0.0


@dataclass
class RunConfig:
    dir: str = "runs/debug"  # run directory: recipe.yaml, metrics, checkpoints, the run lock
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tensorboard: bool = True  # write TensorBoard event files
    progress: bool = True  # show a progress bar with ETA
    peak_tflops: float = 0.0  # MFU's peak per device; 0: a known GPU's, none on CPU (MFU not reported)
    # A collective that does not complete within this many seconds fails its rank; the launcher
    # then prints every rank's Python stack and ends the job (hang detection).
    collective_timeout: float = 600.0


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _read_yaml(path: Path, chain: tuple = ()) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    if path.resolve() in chain:
        raise RecipeError(f"{path}: base: inheritance forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: must be a path relative to the file")
    parent = _read_yaml((path.parent / base), chain + (path.resolve(),))
    return _deep_merge(parent, data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value, for example train.steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            nxt = node.get(key)
            if not isinstance(nxt, dict):
                nxt = {} if nxt is None else nxt
                if not isinstance(nxt, dict):
                    raise RecipeError(f"override {text!r}: {key} is not a section")
            node[key] = dict(nxt)
            node = node[key]
        node[keys[-1]] = value
    return data


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}{hint}")
        return value
    if tp is RopeScaling:
        return _rope_scaling(value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a section (mapping), got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _rope_scaling(value, where: str) -> RopeScaling:
    """model.rope_scaling: a mapping, or a type alone (`model.rope_scaling=llama3`). Type llama3 takes
    Llama-3.1's values for the fields not given (factor 8, original 8192, low 1, high 4); linear and
    yarn need a factor (the default 1.0 would silently scale nothing)."""
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a section (mapping) or a type, got {type(value).__name__} {value!r}")
    kind = value.get("type", "none")
    if kind == "llama3":
        from longtrain.models.sizes import _LLAMA3_ROPE

        value = {**dataclasses.asdict(_LLAMA3_ROPE), **value}
    elif kind in ("linear", "yarn") and "factor" not in value:
        raise RecipeError(f"{where}.factor: required for rope_scaling type {kind}")
    return _build(RopeScaling, value, where)


# Names people bring from other frameworks, for the did-you-mean of an unknown key.
_KEY_ALIASES = {"ac": "activation_checkpoint", "sp": "sequence_parallel", "fsdp": "dp_shard", "dp": "dp_shard",
                "hidden_size": "dim", "intermediate_size": "ffn_dim", "ffn_hidden_size": "ffn_dim",
                "num_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads"}


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            if not close and _KEY_ALIASES.get(str(key)) in names:
                close = [_KEY_ALIASES[str(key)]]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{where}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    try:
        recipe = _build(Recipe, data, "")
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    validate_recipe(recipe, source)
    return recipe


SHIPPED_RECIPES = Path(__file__).parent.parent / "configs"  # package data: longtrain/configs/*.yaml


def recipe_file(path: str | Path) -> Path:
    """The recipe file for `path`: the path itself when it is a file; otherwise a recipe shipped with
    longtrain, by name from any directory (`debug_cpu`, `debug_cpu.yaml`, `configs/debug_cpu.yaml`).
    A path that is neither fails with one line listing the shipped names."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        for candidate in (SHIPPED_RECIPES / path.name, SHIPPED_RECIPES / f"{path.name}.yaml"):
            if candidate.is_file():
                return candidate
    names = ", ".join(sorted(f.stem for f in SHIPPED_RECIPES.glob("*.yaml")))
    raise RecipeError(f"recipe file not found: {path} (recipes shipped with longtrain, by name: {names})")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or the defaults when path is None), apply overrides, validate."""
    data = _read_yaml(recipe_file(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return recipe_from_dict(data, str(path) if path is not None else "recipe")


# ----------------------------------------------------------------------------------------------
# Validation that needs no processes: one line each, naming the key.
# ----------------------------------------------------------------------------------------------
def validate_recipe(recipe: Recipe, source: str = "recipe", world_size: int | None = None) -> None:
    def fail(msg):
        raise RecipeError(f"{source}: {msg}")

    p = recipe.parallel
    for key in ("dp_replicate", "cp", "tp", "pp"):
        if getattr(p, key) < 1:
            fail(f"parallel.{key}: must be at least 1, got {getattr(p, key)}")
    if p.dp_shard < 1 and p.dp_shard != -1:
        fail(f"parallel.dp_shard: must be at least 1 or -1 (fill), got {p.dp_shard}")
    if p.pp_stages_per_rank < 1:
        fail(f"parallel.pp_stages_per_rank: must be at least 1, got {p.pp_stages_per_rank}")
    if p.pp_schedule in ("gpipe", "1f1b") and p.pp_stages_per_rank != 1:
        fail(f"parallel.pp_stages_per_rank: {p.pp_schedule} runs one stage per rank, got {p.pp_stages_per_rank}")
    if p.pp_schedule in ("interleaved_1f1b", "zero_bubble") and p.pp > 1 and p.pp_stages_per_rank < 2:
        fail(f"parallel.pp_stages_per_rank: {p.pp_schedule} needs at least 2 stages per rank")

    launch = recipe.run.launch
    if launch.nproc_per_node < 1 or launch.nnodes < 1:
        fail("run.launch.nproc_per_node and run.launch.nnodes must be at least 1")
    if world_size is None:
        world_size = launch.nproc_per_node * launch.nnodes
    degrees = resolve_degrees(p, world_size, source)

    from longtrain.models.hybrid import HybridConfig
    from longtrain.models.registry import kind_of
    from longtrain.models.sizes import resolve_model_config

    _validate_numbers(recipe, fail)
    try:
        mcfg = resolve_model_config(recipe.model)
    except (KeyError, ValueError) as err:
        fail(str(err).strip("'\""))
    if mcfg.n_heads % p.tp:
        fail(f"model.n_heads: {mcfg.n_heads} heads do not divide by parallel.tp={p.tp}")
    if mcfg.n_kv_heads % p.tp:
        fail(f"model.n_kv_heads: {mcfg.n_kv_heads} kv heads do not divide by parallel.tp={p.tp}")
    kind = kind_of(mcfg)
    if p.cp > 1:
        from longtrain.parallel.context.strategy import CPConfigError, resolve_mode

        try:
            resolve_mode(p.cp_mode, p.cp, mcfg.n_heads // p.tp, mcfg.n_kv_heads // p.tp, p.cp_ulysses_degree, p.tp,
                         contiguous=kind.contiguous_sequence, kv_chunks=p.cp_kv_chunks)
        except CPConfigError as err:
            fail(str(err))
        if isinstance(mcfg, HybridConfig):
            from longtrain.parallel.context.ssm import check_ssm_cp

            try:
                check_ssm_cp(p.ssm_cp_mode, p.cp, mcfg.mamba_heads, mcfg.ngroups, p.tp)
            except ValueError as err:
                fail(str(err))
            if recipe.data.seq_len // p.cp < mcfg.d_conv - 1:
                fail(f"parallel.cp: shards of data.seq_len / cp = {recipe.data.seq_len // p.cp} tokens are shorter "
                     f"than the Mamba conv window d_conv-1 = {mcfg.d_conv - 1}")
    if isinstance(mcfg, HybridConfig) and p.tp > 1:
        if mcfg.mamba_heads % p.tp or mcfg.ngroups % p.tp:
            fail(f"parallel.tp: {p.tp} must divide the Mamba heads ({mcfg.mamba_heads}) and model.ngroups "
                 f"({mcfg.ngroups})")
    n_stages = p.pp * p.pp_stages_per_rank
    if p.pp > 1 and mcfg.tie_embeddings:
        fail("model.tie_embeddings: tied input/output embeddings cannot be split across pipeline stages "
             f"(parallel.pp={p.pp}); untie them")
    if p.pp > 1 and mcfg.n_layers < n_stages:
        fail(f"model.n_layers: {mcfg.n_layers} layers cannot fill {n_stages} pipeline stages "
             f"(parallel.pp={p.pp} x parallel.pp_stages_per_rank={p.pp_stages_per_rank})")
    if p.pp > 1:
        try:
            mcfg.pipeline_stages(n_stages)  # where the model splits (a hybrid's '|' marks must match)
        except ValueError as err:
            fail(str(err))
        if p.pp_split == "sublayers" and isinstance(mcfg, HybridConfig):
            fail("parallel.pp_split: sublayers splits transformer blocks between attention and MLP; a hybrid "
                 "stack's layers are single sublayers already (use layers, and '|' marks in model.pattern)")

    d = recipe.data
    if d.seq_len < 1 or d.batch_size < 1:
        fail("data.seq_len and data.batch_size must be at least 1")
    _validate_data(d, mcfg, fail)
    balance = resolve_balance(recipe.parallel, recipe.data.packing)
    if d.packing == "varlen" and (p.pp > 1 or (p.cp > 1 and balance == "none") or recipe.train.grad_accum > 1
                                  or (p.tp > 1 and p.sequence_parallel)):
        fail("data.packing: varlen bins (one unpadded row of varying length per step) need pp=1, "
             "train.grad_accum=1, no sequence parallel, and cp=1 unless parallel.balance balances them; "
             "use concat or whole")
    if balance != "none":
        _validate_balance(recipe, degrees, fail)
    t = recipe.train
    if t.grad_accum < 1 or d.batch_size % t.grad_accum:
        fail(f"train.grad_accum: {t.grad_accum} must divide data.batch_size={d.batch_size}")
    if p.pp > 1:
        micro = pp_microbatches(p)
        if d.batch_size % micro:
            fail(f"parallel.pp_microbatches: {micro} micro-batches must divide data.batch_size={d.batch_size}")
        if t.grad_accum != 1:
            fail("train.grad_accum: with parallel.pp > 1 use parallel.pp_microbatches instead")
    if d.seq_len % p.tp and p.tp > 1 and p.sequence_parallel:
        fail(f"data.seq_len: {d.seq_len} does not divide by parallel.tp={p.tp} (sequence parallel)")
    if mcfg.max_seq_len < d.seq_len:
        fail(f"data.seq_len: {d.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    if t.steps < 0:
        fail(f"train.steps: must be at least 0, got {t.steps}")
    if t.loss_chunk_tokens < 0:
        fail(f"train.loss_chunk_tokens: must be 0 (full logits) or a positive token count, got {t.loss_chunk_tokens}")
    _validate_offload(recipe.optim, fail)
    if recipe.optim.lr <= 0:
        fail(f"optim.lr: must be positive, got {recipe.optim.lr}")
    if len(recipe.optim.betas) != 2:
        fail(f"optim.betas: expected two numbers, got {recipe.optim.betas}")
    if recipe.checkpoint.keep < 1:
        fail(f"checkpoint.keep: must be at least 1, got {recipe.checkpoint.keep}")
    if recipe.checkpoint.init_from and recipe.model.hf_checkpoint:
        fail("checkpoint.init_from: model.hf_checkpoint gives the initial weights too; set one of them")


# Explicit model sizes must be positive; these floats finite and positive.
_MODEL_COUNTS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "d_state",
                 "d_conv", "expand", "mamba_headdim", "ngroups", "chunk_size")
_MODEL_POSITIVE = ("norm_eps", "rope_theta", "init_std")


def _validate_numbers(recipe: Recipe, fail) -> None:
    """Counts, intervals and rates that would otherwise divide by zero, loop oddly or train on NaN."""
    import math

    m = recipe.model
    for key in _MODEL_COUNTS:
        value = getattr(m, key)
        if value is not None and value < 1:
            fail(f"model.{key}: must be at least 1, got {value}")
    for key in _MODEL_POSITIVE:
        value = getattr(m, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            fail(f"model.{key}: must be a positive number, got {value}")
    o, t = recipe.optim, recipe.train
    for key in ("lr", "min_lr_ratio", "weight_decay", "eps"):
        value = getattr(o, key)
        if not math.isfinite(value) or value < 0 or (key in ("lr", "eps") and value == 0):
            fail(f"optim.{key}: must be a finite {'positive' if key in ('lr', 'eps') else 'non-negative'} "
                 f"number, got {value}")
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 <= b < 1
               for b in o.betas):
        fail(f"optim.betas: expected two numbers in [0, 1), got {o.betas}")
    if o.warmup_steps < 0:
        fail(f"optim.warmup_steps: must be at least 0, got {o.warmup_steps}")
    if not math.isfinite(t.grad_clip) or t.grad_clip < 0:
        fail(f"train.grad_clip: must be a finite number >= 0 (0: no clipping), got {t.grad_clip}")
    launch = recipe.run.launch
    if launch.max_restarts < 0:
        fail(f"run.launch.max_restarts: must be at least 0, got {launch.max_restarts}")
    if not math.isfinite(launch.sigterm_grace_s) or launch.sigterm_grace_s < 0:
        fail(f"run.launch.sigterm_grace_s: must be a number >= 0 (0: measured), got {launch.sigterm_grace_s}")
    if not math.isfinite(recipe.run.collective_timeout) or recipe.run.collective_timeout <= 0:
        fail(f"run.collective_timeout: must be a positive number of seconds, got {recipe.run.collective_timeout}")
    if t.log_every < 1:
        fail(f"train.log_every: must be at least 1, got {t.log_every}")
    if t.eval_every < 0:
        fail(f"train.eval_every: must be at least 0 (0: never), got {t.eval_every}")
    if recipe.checkpoint.every < 0:
        fail(f"checkpoint.every: must be at least 0 (0: only at the end), got {recipe.checkpoint.every}")
    if recipe.data.eval_batches < 0:
        fail(f"data.eval_batches: must be at least 0, got {recipe.data.eval_batches}")


def _validate_offload(o: OptimConfig, fail) -> None:
    if o.offload == "none":
        return
    size = str(o.offload_subgroup_size)
    if size != "auto" and not (size.isdigit() and int(size) >= 1):
        fail(f"optim.offload_subgroup_size: must be auto or an integer >= 1, got {o.offload_subgroup_size!r}")
    stride = str(o.offload_stride)
    if stride != "auto" and not (stride.isdigit() and int(stride) >= 1):
        fail(f"optim.offload_stride: must be auto or an integer >= 1, got {o.offload_stride!r}")
    if o.offload_device_memory_gb < 0:
        fail(f"optim.offload_device_memory_gb: must be >= 0, got {o.offload_device_memory_gb}")
    if size == "auto":
        return  # the model keeps to the budget (a size that fits, or all on the host)
    buffer_gb = 16 * int(size) / 2**30  # fp32 master, m, v, gradient per element
    if o.offload == "interleaved" and 0 < o.offload_device_memory_gb < buffer_gb:
        fail(f"optim.offload_device_memory_gb: {o.offload_device_memory_gb} GiB cannot hold one subgroup's "
             f"device buffers ({buffer_gb:.3g} GiB for optim.offload_subgroup_size={o.offload_subgroup_size})")


def _validate_data(d: DataConfig, mcfg, fail) -> None:
    """Data checks that open no file (files are checked in launch.preflight)."""
    from longtrain.data.pipeline import DataSettings
    from longtrain.data.tokenizers import ByteTokenizer, tokenizer_path

    try:
        settings = DataSettings.from_config(d, 0, "train")
        settings.check()
        path = tokenizer_path(d.tokenizer)
    except ValueError as err:
        fail(str(err))
    if d.packing == "none" and (d.sources or d.source != "builtin" or d.tokenizer != "bytes"):
        fail("data.packing: none (fixed windows of the built-in stream, byte tokenizer) cannot read "
             f"{d.source if not d.sources else 'data.sources'} with tokenizer {d.tokenizer}; "
             "set data.packing: concat, whole or varlen")
    if d.tokenizer.startswith("pretokenized:"):
        try:
            from longtrain.data.tokenizers import PretokenizedTokenizer

            vocab = PretokenizedTokenizer(d.tokenizer).vocab_size
        except ValueError as err:
            fail(str(err))
        if mcfg.vocab_size < vocab:
            fail(f"model.vocab_size: {mcfg.vocab_size} is smaller than the vocabulary of data.tokenizer ({vocab})")
    elif path is None and mcfg.vocab_size < ByteTokenizer.vocab_size:
        fail(f"model.vocab_size: {mcfg.vocab_size} is smaller than the byte tokenizer's vocabulary "
             f"{ByteTokenizer.vocab_size}")
    if d.packing == "varlen":
        longest = d.max_doc_len or settings.budget
        if longest > mcfg.max_seq_len:
            key = "data.max_doc_len" if d.max_doc_len else "data.token_budget"
            fail(f"{key}: varlen documents of up to {longest} tokens exceed model.max_seq_len={mcfg.max_seq_len}")


def _validate_balance(recipe: Recipe, degrees: dict, fail) -> None:
    p = recipe.parallel
    if recipe.data.packing != "varlen":
        fail(f"parallel.balance: {p.balance} balances varlen batches; set data.packing: varlen or balance: none")
    if p.balance_bins < 0:
        fail(f"parallel.balance_bins: {p.balance_bins} must be >= 0 (0: one bin per data rank)")
    if p.pp > 1:
        fail("parallel.balance: pipeline parallelism (parallel.pp > 1) is not supported with balancing; set pp: 1")
    from longtrain.parallel.balance.cost import ClusterError, resolve_cluster

    group = degrees["dp_replicate"] * degrees["dp_shard"] * degrees["cp"]
    try:
        resolve_cluster(recipe.cluster.preset, recipe.cluster.gpus_per_node, world=group)
    except ClusterError as err:
        fail(str(err))


def resolve_degrees(p: ParallelConfig, world_size: int, source: str = "recipe") -> dict:
    """Degrees with dp_shard=-1 filled (parallel/config.py); RecipeError naming the source when they do not fit."""
    try:
        return _resolve_degrees(p, world_size)
    except DegreesError as err:
        raise RecipeError(f"{source}: {err}") from None

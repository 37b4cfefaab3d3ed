"""Training throughput side by side with torchtitan: its llama3 `debugmodel` shape trained by
torchtitan 0.3.0 and by longtrain, in the same processes, interleaved.

    python benchmarks/peer_throughput.py [--processes 1,2] [--seq-len 512] [--batch-size 8]
                                         [--steps 5] [--warmup 2] [--repeats 4] [--out DIR]
                                         [--without-torchtitan]

The shape (issue #17): 6.16M parameters (dim 256, 6 layers, 16 heads, 16 KV heads, SwiGLU hidden
768, vocabulary 2048, untied head, RoPE theta 5e5), seq 512, batch 8 per process, fp32, no
activation checkpointing, on CPU, one intra-op thread per process. `--processes 1,2` runs one
process, then two (FSDP over both: longtrain `parallel.dp_shard=2`, torchtitan its
`apply_fsdp_to_decoder`), each rank its own batch. Goal: longtrain / torchtitan >= 1.05x at both.

torchtitan is driven from Python the way its Trainer drives it (its CLI wants a dataset, a
tokenizer and, for meshes, CUDA): `model_registry("debugmodel")` (fused QKV, RoPE tables sized
to the sequence as its Trainer does; its causal `ScaledDotProductAttention` as the inner attention,
because its language-model backends do not train on CPU: flex attention has no CPU backward,
varlen is CUDA flash), `init_states()`, FSDP through
`apply_fsdp_to_decoder` (applied at one process too, as its Trainer always does; over a CPU
mesh, with plain-sum reductions because gloo has no PREMUL_SUM), its `ChunkedLossWrapper` cross-entropy with the head skipped in forward, its
`clip_grad_norm_` (max norm 1.0) and its `default_adamw(lr=8e-4)` optimizer container (its
default implementation, fused). Its learning-rate scheduler is left out (a few scalar
assignments per step); longtrain sets its scheduled learning rate inside its step.

torchtitan is not a dependency: without it (or when it fails to import) the report says why and
longtrain's side still runs. torchtitan 0.3.0 imports triton and a few packages its metadata does
not pin the way this project does; what installs it beside torch 2.13 without touching the rest:

    pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring_parser typeguard triton==3.9.0

(a plain `pip install torchtitan==0.3.0` would also change datasets, huggingface_hub and fsspec.)

Fairness: both sides train on the same pre-fetched batches (longtrain's loader; data time
excluded), warm up untimed, then timing windows of `--steps` steps alternate ABBA (longtrain,
torchtitan, torchtitan, longtrain, ...) `--repeats` times; each side reports the median window.
Aggregate tokens/s at two processes = tokens of both ranks / the slower rank's wall time, windows
after a barrier. The two sides start from different initialisations (each its own), so their first
losses are reported, not compared.

Writes peer_throughput.json, peer_throughput.md and peer_throughput.png to --out (default
benchmarks/results/).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's parent: `import longtrain`

from longtrain.benchmarks.measure import machine_info, save_figure  # noqa: E402

TARGET = 1.05  # issue #17: longtrain at least 1.05x torchtitan's tokens/s, one process and two (FSDP)
HERE = Path(__file__).resolve().parent
TORCHTITAN_VERSION = "0.3.0"
# torchtitan's llama3 debugmodel (torchtitan/models/llama3/__init__.py, _debugmodel), in longtrain's keys.
DEBUGMODEL = {"vocab_size": 2048, "dim": 256, "n_layers": 6, "n_heads": 16, "n_kv_heads": 16, "ffn_dim": 768,
              "rope_theta": 500000.0, "tie_embeddings": False}


# ----------------------------------------------------------------------------------------------
# torchtitan: is it there?
# ----------------------------------------------------------------------------------------------
def torchtitan_status(disabled: bool) -> str:
    """'available', or why torchtitan's side does not run."""
    if disabled:
        return "skipped (--without-torchtitan)"
    if importlib.util.find_spec("torchtitan") is None:
        return "torchtitan not installed"
    try:
        from importlib.metadata import version

        found = version("torchtitan")
        import torchtitan.models.llama3  # noqa: F401  (pulls in triton, spmd_types, tyro)
    except Exception as err:  # an install with missing dependencies: say which
        return f"torchtitan not importable: {type(err).__name__}: {err}"
    if found != TORCHTITAN_VERSION:
        return f"torchtitan {found} installed; this benchmark drives {TORCHTITAN_VERSION}"
    return "available"


# ----------------------------------------------------------------------------------------------
# The two sides (inside the worker processes)
# ----------------------------------------------------------------------------------------------
def build_recipe(cfg: dict, world: int, run_dir: str):
    from longtrain.launcher.config import load_recipe

    total_steps = cfg["warmup"] + cfg["steps"] * cfg["repeats"]
    overrides = [f"model.{key}={value}" for key, value in DEBUGMODEL.items()] + [
        f"model.max_seq_len={cfg['seq_len']}",
        f"data.seq_len={cfg['seq_len']}",
        f"data.batch_size={cfg['batch_size']}",
        f"parallel.dp_shard={world}", "parallel.dp_replicate=1",
        "parallel.tp=1", "parallel.pp=1", "parallel.cp=1",
        "parallel.mixed_precision=fp32",
        "parallel.activation_checkpoint=none",
        f"run.launch.nproc_per_node={world}",
        "optim.lr=8e-4", "optim.weight_decay=0.1", "optim.eps=1e-8", "train.grad_clip=1.0",
        f"train.steps={total_steps + 10}",
        "train.device=cpu", "train.grad_accum=1", "train.eval_every=0",
        "checkpoint.every=0", "checkpoint.save_at_end=false", "checkpoint.resume=never",
        "run.tensorboard=false", "run.progress=false",
        f"run.dir={run_dir}",
    ]
    return load_recipe(None, overrides)


class TorchtitanSide:
    """torchtitan 0.3.0's debugmodel, loss, FSDP and optimizer, stepped as its Trainer.train_step does."""

    def __init__(self, seq_len: int, world: int):
        import dataclasses

        import torch
        import torchtitan.distributed.utils as tt_dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule
        from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
        from torchtitan.components.optimizer import default_adamw
        from torchtitan.config import CompileConfig
        from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
        from torchtitan.models.common.attention import ScaledDotProductAttention
        from torchtitan.models.common.config_utils import decoder_vocab_size
        from torchtitan.models.llama3 import model_registry

        spec = model_registry("debugmodel")
        config = spec.model
        for layer in config.layers:  # as Trainer.Config's update_from_config: RoPE tables of seq_len
            layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=seq_len)
            # Its language-model attention backends do not train on CPU (flex: "FlexAttention does
            # not support backward on CPU"; varlen: CUDA flash): its own causal SDPA module instead,
            # the same function for one document per row.
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
        with torch.device("meta"):
            model = config.build()
        self.num_params = sum(p.numel() for p in model.parameters())
        # torchtitan's Trainer always applies FSDP (degree 1 included); its meshes default to CUDA,
        # so the mesh is built here on CPU (gloo).
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
        apply_fsdp_to_decoder(model, mesh, param_dtype=torch.float32, reduce_dtype=torch.float32,
                              pp_enabled=False)
        for module in model.modules():  # gloo has no PREMUL_SUM: plain sums (its divide factor is 1.0 already)
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_states(buffer_device=None)
        model.train()
        self.model = model
        self.loss_fn = ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(spec))).build(
                compile_config=CompileConfig())
        self.loss_fn.set_lm_head(model.lm_head)
        model._skip_lm_head = True
        self.optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
        self.clip = tt_dist.clip_grad_norm_
        self.world = world

    def train_step(self, batch: dict) -> float:
        import torch.distributed as dist

        self.optimizers.zero_grad()
        tokens, labels = batch["tokens"], batch["labels"]
        valid = (labels != -100).sum()
        if self.world > 1:
            dist.all_reduce(valid)
        pred = self.model(tokens)  # one document per row: causal attention, positions 0..S-1
        loss, _ = self.loss_fn(pred, labels, valid)
        del pred
        loss.backward()
        self.clip([p for p in self.model.parameters()], 1.0, foreach=True, pp_mesh=None, ep_enabled=False)
        self.optimizers.step()
        return loss.detach()


def _all_sum(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _window(step_fn, batches: list) -> float:
    gc.collect()
    start = time.perf_counter()
    for batch in batches:
        step_fn(batch)
    return time.perf_counter() - start


def measure(cfg: dict, world: int, with_torchtitan: bool, run_dir: str, progress) -> dict:
    import torch
    import torch.distributed as dist

    from longtrain.launcher.trainer import Trainer

    torch.set_num_threads(1)
    recipe = build_recipe(cfg, world, run_dir)
    trainer = Trainer(recipe)
    sides = {"longtrain": trainer.train_step}
    first_step = {"longtrain": trainer.train_step_and_read}
    params = {"longtrain": trainer.model_cfg.num_params()}
    if with_torchtitan:
        titan = TorchtitanSide(cfg["seq_len"], world)
        sides["torchtitan"] = titan.train_step
        first_step["torchtitan"] = lambda b: float(titan.train_step(b))
        params["torchtitan"] = titan.num_params
    n_batches = cfg["warmup"] + cfg["steps"] * cfg["repeats"]
    batches = [next(trainer.loader) for _ in range(n_batches)]  # this rank's batches, data time excluded
    warm, timed = batches[:cfg["warmup"]], batches[cfg["warmup"]:]

    first_loss = {}
    for name, step in first_step.items():
        for i, batch in enumerate(warm):
            out = step(batch)
            if i == 0:
                first_loss[name] = float(out[0] if isinstance(out, tuple) else out)
            progress(1)
    if "torchtitan" in first_loss:  # its loss is this rank's sum / global tokens: the global mean once summed
        first_loss["torchtitan"] = _all_sum(first_loss["torchtitan"])

    tokens_per_window = world * cfg["batch_size"] * cfg["seq_len"] * cfg["steps"]
    names = list(sides)
    repeats: dict[str, list] = {name: [] for name in names}
    for r in range(cfg["repeats"]):
        window = timed[r * cfg["steps"]:(r + 1) * cfg["steps"]]
        for name in (names if r % 2 == 0 else names[::-1]):
            dist.barrier()
            seconds = torch.tensor(_window(sides[name], window), dtype=torch.float64)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            repeats[name].append(tokens_per_window / float(seconds))
            progress(cfg["steps"])
    return {"tokens_per_s": repeats, "first_loss": first_loss, "num_params": params,
            "layout": trainer.dims.describe(), "torch_threads": torch.get_num_threads()}


def phase_worker(cfg: dict, world: int, with_torchtitan: bool, events) -> dict:
    rank = int(os.environ["RANK"])

    def progress(n):
        if rank == 0:
            events.put(n)

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as run_dir:
        return measure(cfg, world, with_torchtitan, run_dir, progress)


def run_phase(cfg: dict, world: int, with_torchtitan: bool, bar) -> dict:
    from longtrain.tests.distributed import run_group

    return run_group(world, phase_worker, cfg, world, with_torchtitan, on_event=bar.update)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def summarize(raw: dict, world: int) -> dict:
    sides = {name: {"median_tokens_per_s": statistics.median(values), "repeats_tokens_per_s": values}
             for name, values in raw["tokens_per_s"].items()}
    out = {"processes": world, "layout": raw["layout"], "first_loss": raw["first_loss"],
           "num_params": raw["num_params"], "torch_threads_per_process": raw["torch_threads"], **sides}
    if "torchtitan" in sides:
        ratio = sides["longtrain"]["median_tokens_per_s"] / sides["torchtitan"]["median_tokens_per_s"]
        out.update(ratio_longtrain_over_torchtitan=ratio, target=TARGET, passed=ratio >= TARGET)
    else:
        out.update(ratio_longtrain_over_torchtitan=None, target=TARGET, passed=None)
    return out


def to_markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [
        "# Training throughput: longtrain vs torchtitan 0.3.0 (llama3 debugmodel shape)",
        "",
        f"torchtitan: {report['torchtitan']}. Shape: {report['num_params'] / 1e6:.2f}M parameters, seq_len "
        f"{c['seq_len']}, batch {c['batch_size']} sequences per process, fp32 on CPU, no activation "
        f"checkpointing; {c['warmup']} warmup steps per side, then {c['repeats']} interleaved (ABBA) windows "
        f"of {c['steps']} steps per side (median shown).",
        "",
        "| processes | layout | longtrain tokens/s | torchtitan tokens/s | longtrain / torchtitan | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in report["phases"]:
        r = report[key]
        tt = r.get("torchtitan")
        ratio = r["ratio_longtrain_over_torchtitan"]
        lines.append(f"| {r['processes']} | {r['layout']} | {r['longtrain']['median_tokens_per_s']:,.0f} | "
                     f"{'-' if tt is None else format(tt['median_tokens_per_s'], ',.0f')} | "
                     f"{'-' if ratio is None else f'{ratio:.3f}x'} | >= {TARGET}x | "
                     f"{'-' if r['passed'] is None else ('pass' if r['passed'] else 'FAIL')} |")
    lines += ["", "All windows (tokens/s) and first losses:", ""]
    for key in report["phases"]:
        r = report[key]
        parts = [f"{name} [{', '.join(f'{v:,.0f}' for v in r[name]['repeats_tokens_per_s'])}]"
                 for name in ("longtrain", "torchtitan") if name in r]
        losses = ", ".join(f"{name} {v:.4f}" for name, v in r["first_loss"].items())
        lines.append(f"- {key}: {'; '.join(parts)}; first-step loss {losses}")
    lines += [
        "",
        "Method: see the docstring of benchmarks/peer_throughput.py (torchtitan driven in-process as its Trainer "
        "steps: its causal SDPA attention (flex has no CPU backward), fused QKV, chunked cross-entropy, FSDP applied at every degree, fused AdamW; "
        "longtrain with its defaults at the same shape).",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu']}), torch {m['torch_version']}, Python {m['python']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = report["phases"]
    width = 0.38
    for i, side in enumerate(("longtrain", "torchtitan")):
        values = [report[k][side]["median_tokens_per_s"] if side in report[k] else 0.0 for k in keys]
        bars = ax.bar([x + (i - 0.5) * width for x in range(len(keys))], values, width, label=side)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{report[k]['processes']} process(es)" for k in keys])
    ax.set_ylabel("tokens/s (median window)")
    ax.set_title("llama3 debugmodel shape, fp32 CPU", fontsize=10)
    ax.legend()
    save_figure(fig, out / "peer_throughput.png", names, dpi=110)
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="1,2", help="comma-separated process counts (default 1,2)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per step (default 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per window (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warmup steps per side (default 2)")
    p.add_argument("--repeats", type=int, default=4, help="timed windows per side, interleaved (default 4)")
    p.add_argument("--without-torchtitan", action="store_true", help="run longtrain's side only")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results/)")
    args = p.parse_args(argv)
    try:
        args.processes = [int(x) for x in args.processes.split(",")]
    except ValueError:
        p.error(f"--processes: expected comma-separated integers, got {args.processes!r}")
    if any(n not in (1, 2) for n in args.processes):
        p.error("--processes: 1 and/or 2")
    if min(args.steps, args.warmup, args.repeats, args.seq_len, args.batch_size) < 1:
        p.error("--steps, --warmup, --repeats, --seq-len and --batch-size must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread per process, inherited by the workers
        os.environ[var] = "1"
    from tqdm import tqdm

    status = torchtitan_status(args.without_torchtitan)
    with_tt = status == "available"
    print(f"torchtitan: {status}", file=sys.stderr)
    cfg = {"seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
           "repeats": args.repeats}
    report: dict = {"machine": machine_info(), "torchtitan": status, "torchtitan_ran": with_tt,
                    "config": cfg | {"model": "torchtitan llama3 debugmodel shape", **DEBUGMODEL, "precision": "fp32",
                                     "device": "cpu", "threads_per_process": 1,
                                     "data_time": "excluded (batches pre-fetched before timing)",
                                     "order": "ABBA interleaved windows, median over repeats"},
                    "phases": []}
    n_sides = 2 if with_tt else 1
    steps = n_sides * (args.warmup + args.steps * args.repeats)
    with tqdm(total=steps * len(args.processes), unit="step", desc="benchmark", file=sys.stderr) as bar:
        for world in args.processes:
            key = f"processes_{world}"
            raw = run_phase(cfg, world, with_tt, bar)
            report[key] = summarize(raw, world)
            report["phases"].append(key)
            report["num_params"] = raw["num_params"]["longtrain"]
    ran = [report[k]["passed"] for k in report["phases"] if report[k]["passed"] is not None]
    report["passed"] = all(ran) if ran else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["figures"] = plot(report, out)
    (out / "peer_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "peer_throughput.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

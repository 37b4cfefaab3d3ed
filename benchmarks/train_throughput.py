"""Training throughput: longtrain's Trainer against a plain PyTorch loop, side by side in one run.

    python benchmarks/train_throughput.py [--steps N] [--warmup N] [--repeats N] [--out DIR]
                                          [--model debug] [--seq-len 256] [--batch-size 4]

Two comparisons, both in tokens/s, fp32 on CPU:

1. `single`: `Trainer.train_step` on one process against a plain loop written here (the same
   `Transformer` class, config and init, the same batches, AdamW(foreach) with the same
   hyper-parameters and parameter groups, cross-entropy, `clip_grad_norm_`, `zero_grad`).
2. `dp2`: longtrain on 2 processes (FSDP2, parallel.dp_shard=2, each rank the same per-rank batch
   size) against two independent plain processes running at the same time; aggregate tokens/s of
   the pair (all tokens of both ranks / the slower rank's wall time).

Fairness rules:
- Every process runs with 1 intra-op thread (OMP/MKL and torch.set_num_threads), so 1 process vs
  2 processes on 2 cores compares like with like.
- Data time is excluded for both sides: every batch is fetched from longtrain's loader before any
  timing starts; the clock runs only around the step calls (host->device copies are inside the
  step for both, a no-op on CPU).
- Warmup steps are run and discarded; then timing windows of `--steps` steps alternate between
  the sides in ABBA order (L P, P L, L P, ...) `--repeats` times, and each side reports the median.
  In the dp2 phase both sides live in the same two processes, with a barrier before each window.
- The first warmup loss of both sides is recorded: it must agree, which shows that the two sides
  do the same work.

Writes `train_throughput.json` and `train_throughput.md` to --out (default benchmarks/results/)
and prints the markdown.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

TARGET = 1.0  # the structure issue (#11): the Trainer at least as fast as the plain loop
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Both sides of the comparison (run inside the worker processes)
# ----------------------------------------------------------------------------------------------
# Each phase: a longtrain layout against `world` independent plain loops. Only the single-process
# comparison has a pass/fail target; the dp2 rows report what data parallelism costs here.
PHASES = [
    {"key": "single", "label": "single process", "world": 1, "overrides": [], "target": TARGET},
    {"key": "dp2_fsdp", "label": "dp2, FSDP2 (dp_shard=2) vs 2 independent plain", "world": 2,
     "overrides": ["parallel.dp_shard=2"], "target": None},
    {"key": "dp2_fsdp_no_reshard", "label": "dp2, FSDP2 without reshard after forward vs 2 plain", "world": 2,
     "overrides": ["parallel.dp_shard=2", "parallel.reshard_after_forward=false"], "target": None},
    {"key": "dp2_replicate", "label": "dp2, replicated (dp_replicate=2) vs 2 independent plain", "world": 2,
     "overrides": ["parallel.dp_replicate=2", "parallel.dp_shard=1"], "target": None},
    # The fixed cost of a step: a model so small (tiny, 16 tokens) that compute is nearly nothing, so
    # the step time is what every step pays whatever the model (lr, token count, clipping, flags).
    {"key": "fixed_cost", "label": "fixed cost per step (tiny model, 1 x 16 tokens)", "world": 1,
     "overrides": ["model.name=tiny", "data.seq_len=16", "data.batch_size=1"], "target": None},
]


def build_recipe(cfg: dict, phase: dict, run_dir: str):
    from longtrain.launcher.config import load_recipe

    world_size = phase["world"]

    total_steps = cfg["warmup"] + cfg["steps"] * cfg["repeats"]
    overrides = [
        f"model.name={cfg['model']}",
        f"data.seq_len={cfg['seq_len']}",
        f"data.batch_size={cfg['batch_size']}",
        "parallel.tp=1", "parallel.pp=1", "parallel.cp=1",
        "parallel.mixed_precision=fp32",
        "parallel.compile=false",
        "parallel.activation_checkpoint=none",
        f"run.launch.nproc_per_node={world_size}",
        f"train.steps={total_steps + 10}",
        "train.device=cpu",
        "train.grad_accum=1",
        "train.eval_every=0",
        "checkpoint.every=0",
        "checkpoint.save_at_end=false",
        "checkpoint.resume=never",
        "run.tensorboard=false",
        "run.progress=false",
        f"run.dir={run_dir}",
    ] + phase["overrides"]
    return load_recipe(None, overrides)


class PlainLoop:
    """The baseline: what a user writes by hand for the same model, data and optimizer."""

    def __init__(self, recipe):
        import torch

        from longtrain.models.sizes import resolve_model_config
        from longtrain.models.transformer import Transformer

        torch.manual_seed(recipe.train.seed)
        self.model = Transformer(resolve_model_config(recipe.model))
        self.model.init_weights(seed=recipe.train.seed)
        o = recipe.optim
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)
        self.grad_clip = recipe.train.grad_clip

    def train_step(self, batch: dict) -> float:
        import torch
        import torch.nn.functional as F

        logits = self.model(batch["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(0, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def count_host_reads(step_fn, batch) -> int:
    """Host waits of one step: on CUDA the synchronizations torch's sync debug mode reports; on CPU
    (where every op is synchronous) the places the training code itself reads a tensor's value
    (item, tolist, float/int/bool of a tensor, called from outside torch), which are the
    synchronizations that code would make on a GPU (torch's own reads of host-side scalars, such
    as the optimizer's step counters, are not)."""
    import warnings as _warnings

    import torch

    if torch.cuda.is_available():
        with _warnings.catch_warnings(record=True) as seen:
            _warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step_fn(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)
    torch_dir = os.path.dirname(torch.__file__)
    count = [0]
    names = ("item", "tolist", "__float__", "__int__", "__bool__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def read(self, *args, **kwargs):
            if not sys._getframe(1).f_code.co_filename.startswith(torch_dir):
                count[0] += 1
            return originals[name](self, *args, **kwargs)
        return read

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        step_fn(batch)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return count[0]


def _window(step_fn, batches: list) -> float:
    """Wall seconds for running step_fn over batches (the only timed region)."""
    gc.collect()
    start = time.perf_counter()
    for batch in batches:
        step_fn(batch)
    return time.perf_counter() - start


def measure(cfg: dict, phase: dict, run_dir: str, progress) -> dict:
    """Build both sides in this process, warm them up, then time alternating windows."""
    import torch
    import torch.distributed as dist

    from longtrain.launcher.trainer import Trainer

    world_size = phase["world"]
    recipe = build_recipe(cfg, phase, run_dir)
    trainer = Trainer(recipe)
    plain = PlainLoop(recipe)
    # Pre-fetch every batch (data time excluded for both sides); plain rank r reads the same
    # batches as longtrain's data rank r.
    n_batches = cfg["warmup"] + cfg["steps"] * cfg["repeats"]
    batches = [next(trainer.loader) for _ in range(n_batches)]
    warm, timed = batches[:cfg["warmup"]], batches[cfg["warmup"]:]

    def longtrain_step(batch):
        trainer.train_step(batch)

    sides = {"longtrain": longtrain_step, "plain": plain.train_step}
    first_loss = {}
    for name, step in (("longtrain", trainer.train_step_and_read), ("plain", plain.train_step)):
        for i, batch in enumerate(warm):
            out = step(batch)
            if i == 0:
                first_loss[name] = float(out[0] if isinstance(out, tuple) else out)
            progress(1)
    # longtrain's loss is the global mean over data ranks; average the plain ranks' losses alike.
    plain_loss = torch.tensor(first_loss.get("plain", float("nan")), dtype=torch.float64)
    dist.all_reduce(plain_loss)
    first_loss["plain"] = float(plain_loss) / world_size

    host_reads = {name: count_host_reads(sides[name], warm[-1]) for name in ("longtrain", "plain")}
    tokens_per_window = world_size * recipe.data.batch_size * recipe.data.seq_len * cfg["steps"]
    repeats = {"longtrain": [], "plain": []}
    for r in range(cfg["repeats"]):
        window = timed[r * cfg["steps"]:(r + 1) * cfg["steps"]]
        order = ("longtrain", "plain") if r % 2 == 0 else ("plain", "longtrain")
        for name in order:
            dist.barrier()
            seconds = torch.tensor(_window(sides[name], window), dtype=torch.float64)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # aggregate rate: the slower rank's wall time
            repeats[name].append(tokens_per_window / float(seconds))
            progress(cfg["steps"])
    return {"tokens_per_s": repeats, "first_loss": first_loss, "host_reads_per_step": host_reads,
            "tokens_per_step": world_size * recipe.data.batch_size * recipe.data.seq_len,
            "num_params": trainer.model_cfg.num_params(),
            "layout": trainer.dims.describe(), "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# Processes: one gloo group per phase (longtrain.tests.distributed), progress streamed back
# ----------------------------------------------------------------------------------------------
def phase_worker(cfg: dict, phase: dict, events) -> dict:
    rank = int(os.environ["RANK"])

    def progress(n):
        if rank == 0:
            events.put(n)

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as run_dir:
        return measure(cfg, phase, run_dir, progress)


def run_phase(cfg: dict, phase: dict, bar) -> dict:
    from longtrain.tests.distributed import run_group

    return run_group(phase["world"], phase_worker, cfg, phase, on_event=bar.update)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def summarize(raw: dict, phase: dict) -> dict:
    sides = {}
    for name, values in raw["tokens_per_s"].items():
        median = statistics.median(values)
        sides[name] = {"median_tokens_per_s": median, "repeats_tokens_per_s": values,
                       "median_ms_per_step": 1000.0 * raw["tokens_per_step"] / median}
    ratio = sides["longtrain"]["median_tokens_per_s"] / sides["plain"]["median_tokens_per_s"]
    fl = raw["first_loss"]
    return {
        "layout": raw["layout"],
        "longtrain": sides["longtrain"],
        "plain": sides["plain"],
        "ratio_longtrain_over_plain": ratio,
        "label": phase["label"],
        "processes": phase["world"],
        "target": phase["target"],
        "passed": None if phase["target"] is None else ratio >= phase["target"],
        "first_loss": fl,
        "losses_match": abs(fl["longtrain"] - fl["plain"]) <= 1e-4 * max(1.0, abs(fl["plain"])),
        "torch_threads_per_process": raw["torch_threads"],
        "host_reads_per_step": raw["host_reads_per_step"],
    }


def machine_info() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "torch_version": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def to_markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [
        "# Training throughput: longtrain vs plain PyTorch",
        "",
        f"Model `{c['model']}` ({report['num_params'] / 1e6:.2f}M parameters), seq_len {c['seq_len']}, "
        f"batch {c['batch_size']} sequences per process, fp32 on CPU; {c['warmup']} warmup steps, then "
        f"{c['repeats']} interleaved windows of {c['steps']} steps per side (median shown).",
        "",
        "| comparison | processes | longtrain tokens/s | plain tokens/s | longtrain / plain | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in PHASES:
        r = report[phase["key"]]
        target = "reported" if r["target"] is None else f">= {r['target']}x"
        result = "-" if r["passed"] is None else ("pass" if r["passed"] else "FAIL")
        lines.append(f"| {r['label']} | {r['processes']} | {r['longtrain']['median_tokens_per_s']:,.0f} | "
                     f"{r['plain']['median_tokens_per_s']:,.0f} | {r['ratio_longtrain_over_plain']:.3f}x | "
                     f"{target} | {result} |")
    fixed = report["fixed_cost"]
    lines += [
        "",
        f"Fixed cost per step (the `fixed_cost` row, where compute is nearly nothing): longtrain "
        f"{fixed['longtrain']['median_ms_per_step']:.2f} ms, plain loop {fixed['plain']['median_ms_per_step']:.2f} ms "
        f"(host reads per step: longtrain {fixed['host_reads_per_step']['longtrain']}, "
        f"plain {fixed['host_reads_per_step']['plain']}).",
        "",
        "All repeats (tokens/s):",
        "",
    ]
    for phase in PHASES:
        key, r = phase["key"], report[phase["key"]]
        lt = ", ".join(f"{v:,.0f}" for v in r["longtrain"]["repeats_tokens_per_s"])
        pl = ", ".join(f"{v:,.0f}" for v in r["plain"]["repeats_tokens_per_s"])
        lines.append(f"- {key}: longtrain [{lt}]; plain [{pl}]; first-step loss longtrain "
                     f"{r['first_loss']['longtrain']:.5f} vs plain {r['first_loss']['plain']:.5f} "
                     f"({'match' if r['losses_match'] else 'MISMATCH'}); host reads per step "
                     f"longtrain {r['host_reads_per_step']['longtrain']} vs plain {r['host_reads_per_step']['plain']}")
    lines += [
        "",
        "Method:",
        "",
        "- 1 intra-op thread per process everywhere (OMP/MKL_NUM_THREADS=1, torch.set_num_threads(1)), so the "
        "1-process and 2-process comparisons are fair on this machine's cores; the single-process rows leave "
        "the other core idle.",
        "- Data loading is excluded for both sides: all batches are fetched from longtrain's loader before "
        "timing; the clock runs only around the step calls (`Trainer.train_step(batch)` vs the plain "
        "forward/loss/backward/clip/AdamW step/zero_grad).",
        "- The plain loop uses the same `Transformer` class, config and seeded init, the same batches, "
        "AdamW(foreach) with the same hyper-parameters and decay groups, a constant learning rate (longtrain "
        "sets its scheduled lr every step, which is inside its timing).",
        "- dp2: longtrain on 2 processes (FSDP2 per block; FSDP2 without resharding after forward; replicated "
        "parameters with an all-reduce of gradients) against two independent plain loops running at the same "
        "time in the same two processes, which communicate nothing: the ratio is the price of data "
        "parallelism over gloo on this machine. Aggregate tokens/s = tokens of both ranks / the slower "
        "rank's wall time; windows start after a barrier.",
        "- Windows alternate ABBA (longtrain, plain, plain, longtrain, ...) to cancel machine drift.",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['processor']}), torch {m['torch_version']}, Python {m['python']}, "
        f"{m['platform']}.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per window (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warmup steps per side (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per side, interleaved (default 3)")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results/)")
    p.add_argument("--model", default="debug", help="named model size (default debug)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per process per step")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        p.error("--steps, --warmup and --repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # One thread per process, inherited by the spawned workers before they load OpenMP.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    from tqdm import tqdm

    cfg = {"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
           "warmup": args.warmup, "repeats": args.repeats}
    # Validate the recipe up front: a bad --model fails in one line, not in a worker traceback.
    from longtrain.launcher.config import RecipeError

    try:
        for phase in PHASES:
            build_recipe(cfg, phase, "unused")
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    steps_per_phase = 2 * (args.warmup + args.steps * args.repeats)
    report = {"machine": machine_info(),
              "config": cfg | {"precision": "fp32", "device": "cpu", "threads_per_process": 1,
                               "data_time": "excluded (batches pre-fetched before timing)",
                               "order": "ABBA interleaved windows, median over repeats"}}
    with tqdm(total=steps_per_phase * len(PHASES), unit="step", desc="benchmark") as bar:
        for phase in PHASES:
            bar.set_postfix_str(phase["key"])
            raw = run_phase(cfg, phase, bar)
            report[phase["key"]] = summarize(raw, phase)
            report["num_params"] = raw["num_params"]
    report["passed"] = all(report[p["key"]]["passed"] for p in PHASES if p["target"] is not None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "train_throughput.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

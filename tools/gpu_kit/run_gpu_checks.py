"""Every GPU check and benchmark of the repository in one run, under ten minutes on one H100,
results under benchmarks/results/ (or --out).

    python tools/gpu_kit/run_gpu_checks.py             # everything
    python tools/gpu_kit/run_gpu_checks.py --dry-run   # list the steps, their commands and budgets
    python tools/gpu_kit/run_gpu_checks.py --only attention_kernel,train_16k

Steps run one after another, each with its own time budget (killed past it, the run goes on);
`gpu_checks.json` / `gpu_checks.md` record each step's command, exit code and seconds. The
training steps record, next to the measured tokens/s, MFU and peak memory, what `longtrain plan`
predicts for the same recipe (memory: validated against these numbers, benchmarks/plan_validation.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOTAL_BUDGET_S = 600

TRAIN = ("-m longtrain.launcher.cli train configs/debug_cpu.yaml model.name=llama-1b parallel.tp=1 "
         "parallel.dp_shard=1 train.device=cuda data.batch_size=1 train.steps={steps} train.eval_every=0 "
         "checkpoint.every=0 checkpoint.save_at_end=false checkpoint.resume=never parallel.mixed_precision=bf16 "
         "train.log_every=5 run.progress=false run.tensorboard=false data.seq_len={seq} "
         "parallel.attention_backend={backend} parallel.activation_checkpoint={ac} run.dir={out}/gpu_runs/{name} --nproc 1")


@dataclass
class Step:
    name: str
    args: str  # arguments to the Python interpreter
    budget_s: int
    what: str
    train: dict = field(default_factory=dict)  # for training steps: the recipe overrides to plan
    code: str = ""  # Python source run with -c instead of args

    def command(self, out: Path) -> list[str]:
        if self.code:
            return [sys.executable, "-c", self.code]
        return [sys.executable, *self.args.format(out=out).split()]


ENV_REPORT = """import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
import flash_attn
print("flash_attn", flash_attn.__version__)
"""


def steps() -> list[Step]:
    out = []
    out.append(Step("environment", "", 30, "torch, CUDA, the GPU, flash-attn importable", code=ENV_REPORT))
    out.append(Step("kernel_tests", "-m pytest -q -x tests/test_attention_kernel.py", 90,
                    "attention kernel tests (the CUDA backends' self-checks run on the GPU)"))
    out.append(Step("attention_kernel", "benchmarks/attention_kernel.py --device cuda --dtype bf16 "
                                        "--lengths 4096,16384,65536 --repeats 5 --out {out}", 150,
                    "attention kernel per backend: accuracy, TFLOP/s, memory (bf16)"))
    # 32K is at the edge of 80 GB without activation checkpointing (longtrain plan, with the chunked loss:
    # 78 GiB; 26 GiB with it; 136 / 77 GiB with the full logits)
    for seq, ac, steps_, budget in ((16384, "none", 20, 90), (32768, "full", 15, 120)):
        name = f"train_{seq // 1024}k"
        out.append(Step(name, TRAIN.format(steps=steps_, seq=seq, backend="flash_attn", ac=ac, name=name, out="{out}"),
                        budget, f"llama-1b training steps at {seq // 1024}K (activation checkpointing {ac}), "
                                f"flash-attn, bf16: tok/s, MFU, peak memory",
                        train={"seq_len": seq, "name": name, "ac": ac}))
    out.append(Step("train_16k_torch", TRAIN.format(steps=20, seq=16384, backend="torch", ac="none",
                                                    name="train_16k_torch", out="{out}"),
                    90, "the same at 16K with PyTorch's fused attention",
                    train={"seq_len": 16384, "name": "train_16k_torch", "ac": "none"}))
    return out


def _run(step: Step, out: Path, log) -> dict:
    cmd = step.command(out)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=step.budget_s)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = 124, (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    log.write(f"==== {step.name}: rc {rc}\n{text}\n")
    return {"name": step.name, "command": " ".join(cmd), "rc": rc, "seconds": time.perf_counter() - start,
            "budget_s": step.budget_s, "tail": text[-2000:]}


def _training_summary(step: Step, out: Path) -> dict:
    """The last logged metrics of a training step and what `longtrain plan` predicts for it."""
    metrics = out / "gpu_runs" / step.train["name"] / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "tokens_per_second" in r]
    last = rows[-1] if rows else {}
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.plan import CLUSTERS, layout_of, workload_of
    from longtrain.models.sizes import resolve_model_config
    from longtrain.parallel.memory_model import estimate_memory
    from longtrain.parallel.step_time import estimate_step_time

    recipe = load_recipe(REPO / "configs" / "debug_cpu.yaml",
                         ["model.name=llama-1b", "parallel.tp=1", "parallel.dp_shard=1", "data.batch_size=1",
                          f"data.seq_len={step.train['seq_len']}", "parallel.mixed_precision=bf16",
                          "run.launch.nproc_per_node=1", "train.device=cuda",
                          f"parallel.activation_checkpoint={step.train['ac']}"])
    lay = layout_of(recipe, 1)
    work = workload_of(recipe, lay, "cuda")
    cfg = resolve_model_config(recipe.model)
    mem = estimate_memory(cfg, lay, work)
    t = estimate_step_time(cfg, lay, work, CLUSTERS["h100"])
    return {"measured": {k: last.get(k) for k in ("step", "tokens_per_second", "mfu", "peak_memory_gb", "loss")},
            "predicted": {"peak_memory_gib": mem.peak_gib, "tokens_per_second": t["tokens_per_second"],
                          "mfu": t["mfu"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--only", default="", help="comma-separated step names")
    p.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    args = p.parse_args(argv)
    chosen = steps()
    names = [s.name for s in chosen]
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in want if n not in names]
        if unknown:
            p.error(f"--only: unknown step(s) {', '.join(unknown)}; known: {', '.join(names)}")
        chosen = [s for s in chosen if s.name in want]
    total = sum(s.budget_s for s in chosen)
    if args.dry_run:
        for s in chosen:
            shown = "python -c <environment report>" if s.code else " ".join(s.command(args.out))
            print(f"{s.name:<18} {s.budget_s:>4} s  {s.what}\n    {shown}")
        print(f"total budget {total} s (limit {TOTAL_BUDGET_S} s)")
        return 0
    import longtrain

    if Path(longtrain.__file__).resolve().parent != REPO:
        p.error(f"the importable longtrain is {Path(longtrain.__file__).parent}, not this checkout {REPO}: "
                f"run `pip install -e {REPO}` (or put a folder holding a `longtrain` link to it on PYTHONPATH)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(args.out / "gpu_checks.log", "w") as log:
        for s in chosen:
            print(f"[{s.name}] {s.what} (budget {s.budget_s} s)", flush=True)
            r = _run(s, args.out, log)
            if s.train:
                try:
                    r["training"] = _training_summary(s, args.out)
                except Exception as err:  # noqa: BLE001 - a summary must not end the run
                    r["training"] = {"error": str(err)}
            print(f"[{s.name}] rc {r['rc']} in {r['seconds']:.0f} s", flush=True)
            results.append(r)
    (args.out / "gpu_checks.json").write_text(json.dumps({"steps": results}, indent=1))
    lines = ["# GPU checks (tools/gpu_kit/run_gpu_checks.py)", "", "| step | rc | seconds | notes |", "|---|---|---|---|"]
    for r in results:
        note = ""
        if "training" in r and "measured" in r["training"]:
            m, pr = r["training"]["measured"], r["training"]["predicted"]
            note = (f"measured {m['tokens_per_second'] or 0:,.0f} tok/s, MFU {100 * (m['mfu'] or 0):.1f}%, "
                    f"peak {m['peak_memory_gb'] or 0:.1f} GiB; plan predicts {pr['tokens_per_second']:,.0f} tok/s, "
                    f"MFU {100 * pr['mfu']:.1f}%, peak {pr['peak_memory_gib']:.1f} GiB")
        lines.append(f"| {r['name']} | {r['rc']} | {r['seconds']:.0f} | {note} |")
    (args.out / "gpu_checks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

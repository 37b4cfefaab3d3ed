"""`longtrain plan`'s memory model against measurement: per-rank peak tensor memory of real training
steps on CPU (gloo ranks), over several layouts (dense and hybrid, with and without activation
checkpointing, cp, tp, pp, FSDP), and the recorded H100 run (benchmarks/results/gpu_training_h100.md).

What is measured: the peak, over one optimizer step after a warm-up step (so the optimizer state
exists), of the bytes of all live tensor storages on the rank: parameters, optimizer state and
everything created during the step, tracked by a TorchDispatchMode that registers the storage of
every op's output (DTensor outputs by their local tensor) and sums the *current* size of every
live storage after each op (FSDP2 frees and re-allocates gathered parameters by resizing their
storage in place, which no op reports). This is what the memory model predicts; the process RSS
(metrics' peak_memory_gb) adds the torch runtime and the allocator's slack, which are not the
layout's doing. The H100 number is torch.cuda.max_memory_allocated (tensor bytes as well).

    python benchmarks/plan_validation.py [--quick] [--out benchmarks/results]

Writes plan_validation.json, plan_validation.md and plan_validation.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOLERANCE = 0.15

# (name, world size, recipe overrides) on the debug-size models, fp32.
BASE = {"model": {"name": "debug"}, "data": {"seq_len": 512, "batch_size": 4, "num_workers": 0},
        "parallel": {"dp_shard": 1, "tp": 1, "cp": 1, "pp": 1}, "train": {"steps": 2, "eval_every": 0},
        "optim": {"warmup_steps": 1}}
LAYOUTS = [
    ("dense single", 1, {}),
    ("dense single, ac full", 1, {"parallel": {"activation_checkpoint": "full"}}),
    ("dense tp2 (sp)", 2, {"parallel": {"tp": 2}}),
    ("dense cp2 ulysses", 2, {"parallel": {"cp": 2, "cp_mode": "ulysses"}}),
    ("dense cp2 ring, ac every 2", 2, {"parallel": {"cp": 2, "cp_mode": "ring", "activation_checkpoint": "every_k"}}),
    ("dense pp2 1f1b", 2, {"parallel": {"pp": 2, "pp_microbatches": 2}}),
    ("dense fsdp2, ac full", 2, {"parallel": {"dp_shard": 2, "activation_checkpoint": "full"}}),
    # FSDP2 with bf16 parameters (the GPU recipes' regime; runs on CPU too)
    ("dense fsdp2 bf16", 2, {"parallel": {"dp_shard": 2, "mixed_precision": "bf16"}}),
    ("dense cp2 zigzag bf16, ac every 2", 2, {"parallel": {"cp": 2, "cp_mode": "zigzag", "mixed_precision": "bf16",
                                                           "activation_checkpoint": "every_k"}}),
    ("hybrid single", 1, {"model": {"kind": "hybrid", "name": "hybrid-debug"}, "data": {"packing": "concat"}}),
    ("hybrid tp2", 2, {"model": {"kind": "hybrid", "name": "hybrid-debug"}, "data": {"packing": "concat"},
                       "parallel": {"tp": 2}}),
    ("hybrid cp2 state passing, ac full", 2, {"model": {"kind": "hybrid", "name": "hybrid-debug"},
                                              "data": {"packing": "concat"},
                                              "parallel": {"cp": 2, "cp_mode": "ulysses", "activation_checkpoint": "full"}}),
]
QUICK = [
    ("tiny single", 1, {"model": {"name": "tiny"}, "data": {"seq_len": 128, "batch_size": 2}}),
    ("tiny tp2, ac full", 2, {"model": {"name": "tiny"}, "data": {"seq_len": 128, "batch_size": 2},
                              "parallel": {"tp": 2, "activation_checkpoint": "full"}}),
]
H100 = {"measured_gib": 74.6, "source": "benchmarks/results/gpu_training_h100.md (packing none, flash_attn)",
        "recipe": {"model": {"name": "llama-1b"}, "data": {"seq_len": 16384, "batch_size": 1},
                   "parallel": {"tp": 1, "dp_shard": 1, "mixed_precision": "bf16"}, "optim": {"fused": "on"},
                   # the run (2026-11-22) predates the chunked loss: the full logits
                   "train": {"device": "cuda", "loss_chunk_tokens": 0}},
        "measured_tokens_per_second": 29005, "measured_mfu": 0.266}


def _merge(a: dict, b: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


# ----------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------
def live_tensor_tracker():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveTensorBytes(TorchDispatchMode):
        """Peak of the summed current size of every live storage seen (see the module docstring)."""

        def __init__(self):
            super().__init__()
            self.storages = WeakIdKeyDictionary()
            self.peak = 0
            self.ops = 0

        def add(self, t) -> None:
            if not isinstance(t, torch.Tensor):
                return
            local = getattr(t, "_local_tensor", None)
            t = local if local is not None else t
            if t.device.type != "meta":
                self.storages[t.untyped_storage()] = None

        def live(self) -> int:
            return sum(s.nbytes() for s in list(self.storages.keys()))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                self.add(t)
            self.ops += 1
            self.peak = max(self.peak, self.live())
            return out

    return LiveTensorBytes()


def _measure(layouts: list) -> list:
    """Runs inside a gloo group: every layout of this world size; returns rows (rank 0)."""
    import torch.distributed as dist

    from longtrain.launcher.config import recipe_from_dict
    from longtrain.launcher.plan import layout_of, workload_of
    from longtrain.launcher.trainer import Trainer
    from longtrain.models.sizes import resolve_model_config
    from longtrain.parallel.memory_model import estimate_memory

    world = dist.get_world_size()
    rows = []
    for name, _, over in layouts:
        data = _merge(_merge(BASE, over), {"run": {"dir": os.path.join(os.environ.get("PLAN_VALIDATION_TMP", "/tmp"),
                                                                       f"plan_{world}"),
                                                   "launch": {"nproc_per_node": world}, "tensorboard": False,
                                                   "progress": False}})
        recipe = recipe_from_dict(data, name)
        trainer = Trainer(recipe)
        trainer.train_step(next(trainer.loader))  # warm-up: optimizer state exists from here on
        tracker = live_tensor_tracker()
        for part in trainer.parts:
            for t in list(part.parameters()) + list(part.buffers()):
                tracker.add(t)
        for opt in trainer.optimizers:
            for state in opt.state.values():
                for v in state.values():
                    tracker.add(v)
        batch = next(trainer.loader)
        static = tracker.live()
        start = time.perf_counter()
        with tracker:
            trainer.train_step(batch)
        seconds = time.perf_counter() - start
        peaks = [None] * world
        dist.all_gather_object(peaks, {"peak": tracker.peak, "static": static, "ops": tracker.ops})
        lay = layout_of(recipe, world)
        work = workload_of(recipe, lay, "cpu")
        est = estimate_memory(resolve_model_config(recipe.model), lay, work)
        measured = max(p["peak"] for p in peaks)
        rows.append({"name": name, "world": world, "layout": lay.describe(), "overrides": over,
                     "measured_peak_bytes_per_rank": [p["peak"] for p in peaks],
                     "measured_static_bytes_per_rank": [p["static"] for p in peaks],
                     "measured_peak_bytes": measured, "predicted_peak_bytes": est.peak_bytes,
                     "predicted_peak_bytes_per_pp_rank": [r["peak_bytes"] for r in est.by_rank],
                     "predicted_phase": est.phase, "predicted_parts": est.parts,
                     "error": est.peak_bytes / measured - 1, "ops_tracked": peaks[0]["ops"],
                     "step_seconds_tracked": seconds})
        del trainer
    return rows


def run_layouts(layouts: list) -> list:
    from longtrain.tests.distributed import run_group

    rows = []
    for world in sorted({w for _, w, _ in layouts}):
        group = [entry for entry in layouts if entry[1] == world]
        rows += run_group(world, _measure, group)
    return rows


def h100_check() -> dict:
    from longtrain.launcher.config import recipe_from_dict
    from longtrain.launcher.plan import CLUSTERS, layout_of, workload_of
    from longtrain.models.sizes import resolve_model_config
    from longtrain.parallel.memory_model import GiB, estimate_memory
    from longtrain.parallel.step_time import estimate_step_time

    recipe = recipe_from_dict(_merge(H100["recipe"], {"run": {"launch": {"nproc_per_node": 1}}}), "h100")
    lay = layout_of(recipe, 1)
    work = workload_of(recipe, lay, "cuda")
    cfg = resolve_model_config(recipe.model)
    mem = estimate_memory(cfg, lay, work)
    t = estimate_step_time(cfg, lay, work, CLUSTERS["h100"])
    return {"source": H100["source"], "precision": work.precision, "measured_peak_gib": H100["measured_gib"],
            "predicted_peak_gib": mem.peak_gib, "predicted_phase": mem.phase,
            "predicted_parts_gib": {k: v / GiB for k, v in mem.parts.items()},
            "error": mem.peak_gib / H100["measured_gib"] - 1,
            "measured_tokens_per_second": H100["measured_tokens_per_second"],
            "predicted_tokens_per_second": t["tokens_per_second"], "measured_mfu": H100["measured_mfu"],
            "predicted_mfu": t["mfu"], "mfu_error": t["mfu"] / H100["measured_mfu"] - 1,
            "time_note": "matmul_efficiency of the h100 preset is fitted to this run: the time check is a fit, "
                         "not a validation"}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def write_report(result: dict, out: Path) -> str:
    mib = 2 ** 20
    lines = ["# `longtrain plan`: predicted against measured per-rank peak memory", "",
             "Measured: the peak over one optimizer step (after a warm-up step) of the bytes of every live tensor "
             "storage on the rank (parameters, optimizer state, gradients, activations, buffers, communication "
             "buffers), tracked op by op by a TorchDispatchMode (benchmarks/plan_validation.py); the largest rank. "
             "Not the process RSS (`peak_memory_gb`), which adds the torch runtime. gloo ranks, "
             f"debug-size models, seq {BASE['data']['seq_len']} x batch {BASE['data']['batch_size']} per data rank. "
             f"Tolerance {TOLERANCE:.0%}. fp32 unless the name says bf16 (FSDP2 with bf16 parameters, fp32 reduction).", "",
             "| layout | ranks | measured MiB | predicted MiB | error | predicted peak at |", "|---|---|---|---|---|---|"]
    for r in result["cpu"]:
        lines.append(f"| {r['name']} ({r['layout']}) | {r['world']} | {r['measured_peak_bytes'] / mib:.1f} | "
                     f"{r['predicted_peak_bytes'] / mib:.1f} | {100 * r['error']:+.1f}% | {r['predicted_phase']} |")
    h = result.get("h100")
    if h:
        lines += ["", f"H100 ({h['source']}): measured {h['measured_peak_gib']:.1f} GiB, predicted "
                      f"{h['predicted_peak_gib']:.1f} GiB ({100 * h['error']:+.1f}%, peak at the {h['predicted_phase']}); "
                      f"throughput measured {h['measured_tokens_per_second']:,} tok/s ({100 * h['measured_mfu']:.1f}% MFU), "
                      f"predicted {h['predicted_tokens_per_second']:,.0f} tok/s ({100 * h['predicted_mfu']:.1f}% MFU; "
                      f"{h['time_note']})."]
    within = result["within_tolerance"]
    lines += ["", f"All within {TOLERANCE:.0%}: {within} ({result['passed_count']} of {result['count']})."]
    text = "\n".join(lines) + "\n"
    (out / f"{result['stem']}.md").write_text(text)
    return text


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["cpu"]
    names = [f"{r['name']} ({r['world']} rank{'s' if r['world'] > 1 else ''})" for r in rows]
    errors = [100 * r["error"] for r in rows]
    if result.get("h100"):
        names.append("H100 llama-1b 16K (recorded run)")
        errors.append(100 * result["h100"]["error"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    ax.barh(range(len(names)), errors, color=["tab:blue"] * len(rows) + ["tab:green"] * (len(names) - len(rows)))
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    for x in (-100 * TOLERANCE, 100 * TOLERANCE):
        ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_xlabel("predicted / measured peak tensor memory per rank - 1 (%)")
    ax.set_title(f"longtrain plan: peak memory per rank (dashed: ±{TOLERANCE:.0%})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two tiny layouts (the smoke test)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    layouts = QUICK if args.quick else LAYOUTS
    rows = run_layouts(layouts)
    result = {"cpu": rows, "h100": h100_check(), "stem": "plan_validation", "tolerance": TOLERANCE}
    from measure import machine_info

    result["machine"] = machine_info()
    checks = [abs(r["error"]) <= TOLERANCE for r in rows] + [abs(result["h100"]["error"]) <= TOLERANCE]
    result.update(count=len(checks), passed_count=sum(checks), within_tolerance=all(checks))
    (out / "plan_validation.json").write_text(json.dumps(result, indent=1, default=float))
    print(write_report(result, out))
    plot(result, out / "plan_validation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

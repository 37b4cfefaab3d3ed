"""Ladder Residual under tensor parallelism: training step time of a standard model, a ladder model
with its all-reduces overlapped, and the same ladder model waiting at once, side by side.

    python benchmarks/ladder.py [--tp 2 4] [--dim 128] [--layers 4] [--seq-len 256] [--batch-size 2]
                                [--steps 2] [--warmup 1] [--repeats 7] [--sequence-parallel] [--out DIR]
    # GPUs (nccl, one process per GPU, tp = the world; written as ladder_cuda_tp<N>.*):
    benchmarks/ladder_gpu.sh   (torchrun at tp 2, 4, 8 with Llama-3-8B-wide layers)

What is measured, per tp degree, in one process group, same shapes, fp32 on CPU (gloo):
- step time (forward + backward + optimizer, longtrain's Trainer.train_step) of `standard`,
  `ladder` (parallel.ladder_overlap=true) and `ladder_no_overlap` (false), timed in windows that
  rotate the order of the three each repeat; the fastest window per variant (others share the
  machine and only ever add time), the median beside it;
- the sublayer reductions, forward (each sublayer's output all-reduce / reduce-scatter) and
  backward (each sublayer's input-gradient all-reduce / reduce-scatter): the host time blocked in
  their wait(), in the median window (each variant's least-waiting window beside it). Waiting at
  once (no overlap) that is the whole reduction time; with overlap it is what stays exposed, so hidden = 1 - exposed(overlap) / exposed(no overlap), forward, backward
  and both; beside it the time of the one all-reduce per step of the norm weight gradients that
  the backward overlap adds (ParallelModel.finish_gradients);
- a cost model of the same for GPUs (`gpu_model`, not measured): per sublayer, compute = FLOPs /
  (tp x peak) in training or weight bytes / HBM bandwidth in decode, communication = ring
  all-reduce 2 (tp-1)/tp x bytes / bus bandwidth + latency; ladder hides min(comm, next compute).

With --decode (written as ladder_decode.*): decode tokens/s of the same three variants, tensor-parallel
over gloo (parallel/decode.py, as `longtrain generate --nproc N` runs it), at batch 1, 4 and 16
(--decode-batches): greedy, --decode-tokens new tokens after a --decode-prompt-token prompt; the
time from the first decode step to the last token (prefill excluded), the fastest of --repeats
windows rotating the variants' order, the slowest rank's; and the host time blocked in the ladder's
reduction waits, so hidden = 1 - exposed(overlap) / exposed(no overlap) as in training.

    python benchmarks/ladder.py --decode [--tp 2 4] [--dim 512] [--layers 4] [--decode-batches 1 4 16]

On this shared 2-core CPU, tp ranks oversubscribe the cores and gloo's threads compete with the
compute they should hide behind, so the hidden share here is a lower bound of what a GPU (NCCL on
its own stream, CUDA_DEVICE_MAX_CONNECTIONS > 1) shows.
Writes ladder.json, ladder.md and ladder.png to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "standard": ["model.residual=standard"],
    "ladder": ["model.residual=ladder", "parallel.ladder_overlap=true"],
    "ladder_no_overlap": ["model.residual=ladder", "parallel.ladder_overlap=false"],
}


def _recipe(cfg: dict, variant: str, world: int, run_dir: str):
    from longtrain.launcher.config import load_recipe

    steps = cfg["warmup"] + cfg["steps"] * cfg["repeats"]
    overrides = [
        "model.name=null", "model.vocab_size=260", f"model.dim={cfg['dim']}", f"model.n_layers={cfg['layers']}",
        f"model.n_heads={cfg['heads']}", f"model.n_kv_heads={cfg['heads']}", f"model.ffn_dim={cfg['ffn_dim']}",
        f"model.max_seq_len={cfg['seq_len']}", f"data.seq_len={cfg['seq_len']}", f"data.batch_size={cfg['batch_size']}",
        f"parallel.tp={world}", "parallel.dp_shard=1", f"parallel.sequence_parallel={str(cfg['sp']).lower()}",
        f"parallel.mixed_precision={'bf16' if cfg.get('bf16') else 'fp32'}", f"run.launch.nproc_per_node={world}", f"train.steps={steps + 5}",
        "checkpoint.save_at_end=false", "checkpoint.resume=never", "run.tensorboard=false", "run.progress=false",
        f"run.dir={run_dir}", "data.num_workers=0",
    ] + VARIANTS[variant]
    return load_recipe(None, overrides)


def measure(cfg: dict) -> dict:
    """Runs on every rank of a tp group; returns rank 0's report for this tp degree."""
    import torch
    import torch.distributed as dist

    from longtrain.launcher.trainer import Trainer

    warnings.filterwarnings("ignore")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    trainers, batches, first_loss = {}, {}, {}
    with tempfile.TemporaryDirectory() as run_dir:
        for name in VARIANTS:
            trainers[name] = Trainer(_recipe(cfg, name, world, run_dir))
            n = cfg["warmup"] + cfg["steps"] * cfg["repeats"]
            batches[name] = [next(trainers[name].loader) for _ in range(n)]
            for i, batch in enumerate(batches[name][:cfg["warmup"]]):
                loss, _ = trainers[name].train_step_and_read(batch)
                first_loss.setdefault(name, loss)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    windows = {name: [] for name in VARIANTS}
    exposed = {name: {"forward": [], "backward": [], "norm_grad": []} for name in VARIANTS}
    counters = {"forward": "wait_seconds", "backward": "grad_wait_seconds", "norm_grad": "norm_grad_seconds"}
    names = list(VARIANTS)
    for rep in range(cfg["repeats"]):
        order = names[rep % 3:] + names[:rep % 3]  # rotate which variant goes first
        for name in order:
            trainer = trainers[name]
            reductions = trainer.parts[0].residual_sync
            timed = batches[name][cfg["warmup"] + rep * cfg["steps"]:][:cfg["steps"]]
            dist.barrier()
            sync()
            waited = {kind: getattr(reductions, attr, 0.0) for kind, attr in counters.items()}
            began = time.perf_counter()
            for batch in timed:
                trainer.train_step(batch)
            sync()
            elapsed = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's window
            windows[name].append(float(elapsed) / len(timed))
            for kind, attr in counters.items():
                exposed[name][kind].append((getattr(reductions, attr, 0.0) - waited[kind]) / len(timed))
    out = {"tp": world, "first_loss": first_loss}
    for name in VARIANTS:
        # Other processes share this machine: interference only adds time, so the fastest window
        # is the estimate (the median is reported beside it).
        # The waits: the median window (the least-waiting window's total beside it).
        waits = {kind: statistics.median(values) for kind, values in exposed[name].items()}
        totals = [f + b for f, b in zip(exposed[name]["forward"], exposed[name]["backward"])]
        out[name] = {"step_s": min(windows[name]), "median_step_s": statistics.median(windows[name]),
                     "windows_step_s": windows[name],
                     "exposed_reduction_s": statistics.median(totals),
                     "exposed_forward_s": waits["forward"], "exposed_backward_s": waits["backward"],
                     "norm_grad_sum_s": waits["norm_grad"], "least_exposed_reduction_s": min(totals),
                     "windows_exposed": exposed[name]}
    off, on = out["ladder_no_overlap"], out["ladder"]
    comm = off["exposed_reduction_s"]
    out["reduction_s"] = comm
    out["reduction_forward_s"], out["reduction_backward_s"] = off["exposed_forward_s"], off["exposed_backward_s"]
    out["hidden_share"] = (1 - on["exposed_reduction_s"] / comm) if comm > 0 else None
    least = off["least_exposed_reduction_s"]
    out["least_window_hidden_share"] = (1 - on["least_exposed_reduction_s"] / least) if least > 0 else None
    for kind in ("forward", "backward"):
        total = off[f"exposed_{kind}_s"]
        out[f"hidden_share_{kind}"] = (1 - on[f"exposed_{kind}_s"] / total) if total > 0 else None
    out["speedup_ladder_over_standard"] = out["standard"]["step_s"] / out["ladder"]["step_s"]
    out["speedup_overlap"] = out["ladder_no_overlap"]["step_s"] / out["ladder"]["step_s"]
    out["losses_match"] = abs(first_loss["ladder"] - first_loss["ladder_no_overlap"]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------
DECODE_VARIANTS = {"standard": ("standard", True), "ladder": ("ladder", True), "ladder_no_overlap": ("ladder", False)}


def _timed_decode(model, prompts, new_tokens: int, sync) -> tuple[float, object]:
    """Seconds from the start of the first decode step (the model's second call) to the last token."""

    from longtrain.models.decode import generate

    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append(time.perf_counter()))
    try:
        tokens, _ = generate(model, prompts, new_tokens, sync_tokens=sync)
    finally:
        handle.remove()
    return time.perf_counter() - calls[1], tokens


def measure_decode(cfg: dict) -> dict:
    """Runs on every rank of a tp group; returns rank 0's decode report for this tp degree."""
    import torch
    import torch.distributed as dist

    from longtrain.models import build_model
    from longtrain.models.transformer import TransformerConfig
    from longtrain.parallel.decode import TokenBroadcast, shard_for_decode

    warnings.filterwarnings("ignore")
    group = dist.group.WORLD
    world = dist.get_world_size()
    models, reductions = {}, {}
    for name, (residual, overlap) in DECODE_VARIANTS.items():
        mcfg = TransformerConfig(vocab_size=260, dim=cfg["dim"], n_layers=cfg["layers"], n_heads=cfg["heads"],
                                 n_kv_heads=cfg["heads"], ffn_dim=cfg["ffn_dim"], residual=residual,
                                 max_seq_len=cfg["decode_prompt"] + cfg["decode_tokens"] + 1)
        model = build_model(mcfg).eval()
        model.init_weights(seed=0)
        _, reductions[name] = shard_for_decode(model, group, ladder_overlap=overlap)
        models[name] = model
    sync = TokenBroadcast(group)
    names = list(DECODE_VARIANTS)
    rows = []
    for batch in cfg["decode_batches"]:
        prompts = torch.randint(0, 260, (batch, cfg["decode_prompt"]), generator=torch.Generator().manual_seed(batch))
        tokens = {}
        for name in names:  # warm-up (and the tokens: overlap on and off must agree)
            tokens[name] = _timed_decode(models[name], prompts, cfg["decode_tokens"], sync)[1]
        windows = {name: [] for name in names}
        exposed = {name: [] for name in names}
        steps = cfg["decode_tokens"] - 1
        for rep in range(cfg["repeats"]):
            for name in names[rep % 3:] + names[:rep % 3]:
                red = reductions[name]
                waited = 0.0 if red is None else red.wait_seconds
                dist.barrier()
                elapsed, _ = _timed_decode(models[name], prompts, cfg["decode_tokens"], sync)
                elapsed = torch.tensor([elapsed], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                windows[name].append(float(elapsed))
                exposed[name].append(((0.0 if red is None else red.wait_seconds) - waited) / steps)
        row = {"tp": world, "batch": batch, "decode_steps": steps,
               "tokens_match_overlap_on_off": bool(torch.equal(tokens["ladder"], tokens["ladder_no_overlap"]))}
        for name in names:
            best = min(windows[name])
            row[name] = {"tokens_per_s": batch * steps / best, "step_s": best / steps,
                         "median_tokens_per_s": batch * steps / statistics.median(windows[name]),
                         "windows_s": windows[name], "exposed_reduction_s_per_step": statistics.median(exposed[name])}
        comm = row["ladder_no_overlap"]["exposed_reduction_s_per_step"]
        row["reduction_s_per_step"] = comm
        row["hidden_share"] = (1 - row["ladder"]["exposed_reduction_s_per_step"] / comm) if comm > 0 else None
        row["speedup_ladder_over_standard"] = row["ladder"]["tokens_per_s"] / row["standard"]["tokens_per_s"]
        row["speedup_overlap"] = row["ladder"]["tokens_per_s"] / row["ladder_no_overlap"]["tokens_per_s"]
        rows.append(row)
    return {"tp": world, "rows": rows}


def decode_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# Ladder Residual decode under tensor parallelism ({report['device']})", "",
             f"Model dim {cfg['dim']}, {cfg['layers']} layers, {cfg['heads']} heads, ffn {cfg['ffn_dim']}, fp32; greedy, "
             f"{cfg['decode_tokens']} new tokens after a {cfg['decode_prompt']}-token prompt, tokens/s over the decode "
             f"steps (prefill excluded), the fastest of {cfg['repeats']} windows (slowest rank). Machine: "
             f"{report['machine'].get('cpu')} x {report['machine'].get('cpu_count')}, shared: other processes used "
             f"{100 * (report.get('other_processes_cpu_share') or 0):.0f}% of its CPU during the run.", "",
             "| tp | batch | standard tok/s | ladder tok/s | ladder, no overlap tok/s | ladder / standard | "
             "overlap speed-up | reduction wait s/step (no overlap) | exposed with overlap | hidden |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in report["results"]:
        for r in result["rows"]:
            hidden = "-" if r["hidden_share"] is None else f"{100 * r['hidden_share']:.0f}%"
            lines.append(f"| {r['tp']} | {r['batch']} | {r['standard']['tokens_per_s']:.1f} | "
                         f"{r['ladder']['tokens_per_s']:.1f} | {r['ladder_no_overlap']['tokens_per_s']:.1f} | "
                         f"{r['speedup_ladder_over_standard']:.2f}x | {r['speedup_overlap']:.2f}x | "
                         f"{r['reduction_s_per_step']:.5f} | {r['ladder']['exposed_reduction_s_per_step']:.5f} | "
                         f"{hidden} |")
    lines += ["", "Goal (issue 13): ladder at least 1.2x standard at tp 4, batch 1. Hidden = 1 - (host time blocked "
              "in the ladder's reduction waits with overlap) / (the same waiting at once)."]
    return "\n".join(lines) + "\n"


def decode_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for result in report["results"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.25
    for i, name in enumerate(DECODE_VARIANTS):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [r[name]["tokens_per_s"] for r in rows], width,
               label=name)
    ax.set_xticks(range(len(rows)), [f"tp{r['tp']}\nbatch {r['batch']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"Ladder Residual decode ({report['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# What a GPU would show: a cost model, not a measurement
# ----------------------------------------------------------------------------------------------
def gpu_model(dim=8192, ffn=28672, heads=64, kv_heads=8, tp=8, tokens=1, mode="decode", peak_tflops=989.0,
              hbm_tb_s=3.35, bus_gb_s=360.0, latency_us=12.0) -> dict:
    """Per layer (attention + MLP) on an H100-class GPU with NVLink (bf16). Per sublayer: compute
    (decode: this rank's weights read once from HBM; train: 2 x tokens x params / tp FLOPs forward,
    twice that backward), one ring all-reduce of tokens x dim in forward and one of the input
    gradient in backward (2 (tp-1)/tp x bytes / bus bandwidth + latency). Standard pays compute +
    all-reduce; ladder as built here hides each forward all-reduce behind the next sublayer's
    forward and each backward one behind the previous sublayer's backward (max(compute, all-reduce))."""
    head = dim // heads
    params = {"attention": dim * head * (2 * heads + 2 * kv_heads), "mlp": 3 * dim * ffn}
    comm = 2 * (tp - 1) / tp * tokens * dim * 2 / (bus_gb_s * 1e9) + latency_us * 1e-6
    rows, standard, ladder = {}, 0.0, 0.0
    for name, p in params.items():
        if mode == "decode":
            fwd, bwd = p / tp * 2 / (hbm_tb_s * 1e12), 0.0
        else:
            fwd = 2 * tokens * p / tp / (peak_tflops * 1e12)
            bwd = 2 * fwd
        bwd_comm = comm if mode != "decode" else 0.0
        rows[name] = {"compute_us": (fwd + bwd) * 1e6, "allreduce_us": comm * 1e6}
        standard += fwd + comm + bwd + bwd_comm
        ladder += max(fwd, comm) + max(bwd, bwd_comm)
    return {"mode": mode, "tp": tp, "tokens": tokens, "sublayers": rows, "layer_standard_us": standard * 1e6,
            "layer_ladder_us": ladder * 1e6, "speedup": standard / ladder}


def gpu_table() -> list[dict]:
    return [gpu_model(tokens=t, mode="decode") for t in (1, 16, 64)] + \
           [gpu_model(dim=4096, ffn=14336, heads=32, kv_heads=8, tp=8, tokens=8192, mode="train")]


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# Ladder Residual under tensor parallelism ({report['device']})", "",
             f"Model dim {cfg['dim']}, {cfg['layers']} layers, ffn {cfg['ffn_dim']}, batch {cfg['batch_size']} x "
             f"{cfg['seq_len']} tokens per step, {'bf16' if cfg.get('bf16') else 'fp32'}, sequence parallel {cfg['sp']}; the fastest of {cfg['repeats']} "
             f"windows of {cfg['steps']} steps (median reduction wait). Machine: {report['machine'].get('cpu')} x "
             f"{report['machine'].get('cpu_count')}.", "",
             "| tp | standard s/step | ladder s/step | ladder, no overlap s/step | ladder / standard speed-up | "
             "overlap speed-up | reduction time s/step (fwd + bwd) | exposed with overlap (fwd + bwd) | hidden | "
             "hidden fwd | hidden bwd | hidden (least-waiting windows) | norm-weight grad sum s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    for r in report["results"]:
        on, off = r["ladder"], r["ladder_no_overlap"]
        lines.append(f"| {r['tp']} | {r['standard']['step_s']:.4f} | {on['step_s']:.4f} | "
                     f"{off['step_s']:.4f} | {r['speedup_ladder_over_standard']:.2f}x | "
                     f"{r['speedup_overlap']:.2f}x | {r['reduction_s']:.4f} ({off['exposed_forward_s']:.4f} + "
                     f"{off['exposed_backward_s']:.4f}) | {on['exposed_reduction_s']:.4f} ({on['exposed_forward_s']:.4f} + "
                     f"{on['exposed_backward_s']:.4f}) | {pct(r['hidden_share'])} | {pct(r['hidden_share_forward'])} | "
                     f"{pct(r['hidden_share_backward'])} | {pct(r['least_window_hidden_share'])} | {on['norm_grad_sum_s']:.4f} |")
    lines += ["", "Hidden = 1 - (host time blocked waiting for the sublayer reductions with overlap) / "
              "(the same without overlap, where the wait is the whole reduction); forward: the sublayer output "
              "reductions, backward: the input-gradient reductions. The norm-weight gradient sum (one all-reduce "
              "of every sublayer norm's weight gradient per step) is the communication the backward overlap "
              "adds; it is not in the hidden share.", "",
              "## Cost model for GPUs (not measured; H100 bf16, NVLink ring all-reduce 360 GB/s bus, 12 us latency)",
              "", "| mode | tp | tokens | attention compute us | MLP compute us | all-reduce us | layer standard us | "
              "layer ladder us | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for g in report["gpu_model"]:
        s = g["sublayers"]
        lines.append(f"| {g['mode']} | {g['tp']} | {g['tokens']} | {s['attention']['compute_us']:.1f} | "
                     f"{s['mlp']['compute_us']:.1f} | {s['mlp']['allreduce_us']:.1f} | {g['layer_standard_us']:.1f} | "
                     f"{g['layer_ladder_us']:.1f} | {g['speedup']:.2f}x |")
    dec = report["gpu_model"][0]["sublayers"]
    lines += ["", f"Decode (Llama-3-70B shapes, TP8, batch 1): a sublayer reads its weight shard in "
              f"{dec['attention']['compute_us']:.0f} us (attention) or {dec['mlp']['compute_us']:.0f} us (MLP), and "
              f"its all-reduce, latency bound, takes {dec['mlp']['allreduce_us']:.0f} us: ladder puts each all-reduce "
              "behind the next sublayer's weight read. KV-cache reads, the head and the sampling are not modelled, "
              "which is why the model's decode speed-up does not fall with the batch as the paper's does (1.31x at "
              "batch 1, 1.16x at 64, TP8 H100). Training (Llama-3-8B shapes, 8K tokens per sequence) is compute bound: "
              "the all-reduces fit behind the neighbouring sublayer entirely, in forward and in backward."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tps = [r["tp"] for r in report["results"]]
    width = 0.25
    for i, name in enumerate(VARIANTS):
        ax.bar([x + (i - 1) * width for x in range(len(tps))], [r[name]["step_s"] for r in report["results"]],
               width, label=name)
    ax.set_xticks(range(len(tps)), [f"tp{t}" for t in tps])
    ax.set_ylabel("seconds per training step")
    ax.set_title(f"Ladder Residual step time ({report['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn-dim", type=int, default=344)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 parameters (FSDP mixed precision / autocast on CUDA)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--decode", action="store_true", help="measure decode tokens/s instead (ladder_decode.*)")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--decode-prompt", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=33)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    cfg = {"dim": args.dim, "heads": args.heads, "ffn_dim": args.ffn_dim, "layers": args.layers,
           "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
           "repeats": args.repeats, "sp": args.sequence_parallel, "bf16": args.bf16}
    sys.path.insert(0, str(HERE))
    from measure import MachineLoad, machine_info, write_results

    if args.decode:
        from longtrain.tests.distributed import run_group

        load = MachineLoad()
        cfg.update(decode_batches=args.decode_batches, decode_prompt=args.decode_prompt,
                   decode_tokens=args.decode_tokens)
        report = {"config": cfg, "device": "cpu, gloo", "machine": machine_info(),
                  "results": [run_group(tp, measure_decode, cfg) for tp in args.tp]}
        report["other_processes_cpu_share"] = load.other_share()
        write_results(args.out, "ladder_decode", report, decode_markdown(report), None if args.no_plot else decode_plot)
        return 0

    if "RANK" in os.environ:  # under torchrun: one tp degree, the world (GPUs with nccl)
        results = [measure(cfg)]
        import torch
        import torch.distributed as dist

        device = "cuda, nccl" if torch.cuda.is_available() else "cpu, gloo"
        stem = f"ladder_{'cuda' if torch.cuda.is_available() else 'cpu'}_tp{dist.get_world_size()}"
        if dist.get_rank() != 0:
            return 0
    else:
        from longtrain.tests.distributed import run_group

        results = [run_group(tp, measure, cfg) for tp in args.tp]
        device, stem = "cpu, gloo", "ladder"
    report = {"config": cfg, "device": device, "machine": machine_info(), "results": results,
              "gpu_model": gpu_table()}
    write_results(args.out, stem, report, markdown(report), None if args.no_plot else plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of the loss part of a training step (output head + cross-entropy, forward and
backward) with a 128K vocabulary: the full fp32 logits (F.linear, .float(), F.cross_entropy) against
kernels/chunked_loss.py at a few chunk sizes; and under tensor parallel (--tp, 2 gloo ranks by
default), per rank, the vocabulary-sharded head gathered to full logits (ColwiseParallel, output
Replicate, as parallel/tensor_parallel.py shards the head) against parallel/vocab_parallel_loss.py.

    python benchmarks/chunked_loss.py [--tokens 4096] [--dim 64] [--vocab 128256]
                                      [--chunks 256,1024] [--tp 2] [--tp-tokens 2048]
                                      [--preset tiny] [--out DIR]

Memory is the peak of live CPU tensor bytes allocated during the loss's forward and backward
(torch.profiler memory events: every allocation and free of the CPU allocator, not RSS), above
what was live before (the hidden states, the head's weight, the labels). fp32, 1 thread. The
losses and gradients of both paths are compared (the same inputs; max abs difference).
Writes chunked_loss.json and chunked_loss.md to --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's parent: `import longtrain`

from longtrain.benchmarks.measure import machine_info, mib, profiler_peak_bytes  # noqa: E402
from longtrain.kernels.chunked_loss import chunked_linear_cross_entropy  # noqa: E402

PRESETS = {"tiny": {"tokens": 512, "dim": 32, "vocab": 8192, "chunks": "64,128", "tp_tokens": 512}}


def profiled_peak_bytes(fn) -> tuple[int, object]:
    """Peak of the running sum of allocations and frees (bytes) while fn() runs, and its result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return profiler_peak_bytes(prof), result


def inputs(tokens: int, dim: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, dim, generator=gen)
    w = torch.randn(vocab, dim, generator=gen) * dim ** -0.5
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::7] = -100  # some tokens outside the loss (document boundaries, padding)
    return h, w, labels


def run_loss(kind: str, h, w, labels, chunk: int):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        if kind == "full":
            loss = F.cross_entropy(F.linear(hh, ww).float(), labels, ignore_index=-100, reduction="sum")
        else:
            loss = chunked_linear_cross_entropy(hh, ww, labels, chunk)
        loss.backward()
        return loss.detach()

    started = time.perf_counter()
    peak, loss = profiled_peak_bytes(step)
    return {"peak_bytes": peak, "wall_s": time.perf_counter() - started, "loss": float(loss)}, hh.grad, ww.grad


def measure(tokens: int, dim: int, vocab: int, chunks: list[int]) -> dict:
    torch.set_num_threads(1)
    h, w, labels = inputs(tokens, dim, vocab)
    full, gh, gw = run_loss("full", h, w, labels, 0)
    full["logits_fp32_bytes"] = tokens * vocab * 4
    out = {"full": full, "chunked": {}}
    for chunk in chunks:
        res, ch, cw = run_loss("chunked", h, w, labels, chunk)
        res["ratio_vs_full"] = full["peak_bytes"] / res["peak_bytes"]
        res["loss_abs_diff"] = abs(res["loss"] - full["loss"])
        res["loss_rel_diff"] = res["loss_abs_diff"] / abs(full["loss"])
        res["grad_h_max_abs_diff"] = float((ch - gh).abs().max())
        res["grad_w_max_abs_diff"] = float((cw - gw).abs().max())
        out["chunked"][str(chunk)] = res
    return out


def tp_worker(tokens: int, dim: int, vocab: int, chunks: list[int]) -> dict:
    """On each rank of a tp group: the loss part's peak with the head split by vocabulary rows,
    gathered to full logits vs the vocabulary-parallel chunks; every rank's numbers, gathered."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from longtrain.parallel.vocab_parallel_loss import vocab_parallel_linear_cross_entropy

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    h, w, labels = inputs(tokens, dim, vocab)
    head = nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    # The head as the model's TP plan shards it: by vocabulary, its output gathered replicated.
    parallelize_module(head, mesh, ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))

    def run(chunk: int):
        head.weight.grad = None
        hh = h.clone().requires_grad_()

        def step():
            if chunk == 0:
                loss = F.cross_entropy(head(hh).float(), labels, ignore_index=-100, reduction="sum")
            else:
                loss = vocab_parallel_linear_cross_entropy(hh, head.weight, labels, chunk, -100, Replicate())
            loss.backward()
            return loss.detach()

        dist.barrier()
        started = time.perf_counter()
        peak, loss = profiled_peak_bytes(step)
        return ({"peak_bytes": peak, "wall_s": time.perf_counter() - started, "loss": float(loss)},
                hh.grad, head.weight.grad.to_local().clone())

    full, gh, gw = run(0)
    full["logits_fp32_bytes"] = tokens * vocab * 4
    out = {"full": full, "chunked": {}}
    for chunk in chunks:
        res, ch, cw = run(chunk)
        res["local_logits_fp32_bytes"] = chunk * vocab // dist.get_world_size() * 4
        res["loss_rel_diff"] = abs(res["loss"] - full["loss"]) / abs(full["loss"])
        res["grad_h_max_abs_diff"] = float((ch - gh).abs().max())
        res["grad_w_max_abs_diff"] = float((cw - gw).abs().max())
        out["chunked"][str(chunk)] = res
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, out)
    return ranks


def measure_tp(tp: int, tokens: int, dim: int, vocab: int, chunks: list[int]) -> dict:
    """The tp comparison: per path the largest peak over the ranks, and the ratio full / chunked."""
    from longtrain.tests.distributed import run_group

    ranks = run_group(tp, tp_worker, tokens, dim, vocab, chunks)
    full = {"peak_bytes": max(r["full"]["peak_bytes"] for r in ranks),
            "wall_s": max(r["full"]["wall_s"] for r in ranks),
            "logits_fp32_bytes": ranks[0]["full"]["logits_fp32_bytes"]}
    out = {"tp": tp, "tokens": tokens, "full": full, "chunked": {}}
    for chunk in chunks:
        per_rank = [r["chunked"][str(chunk)] for r in ranks]
        res = {key: max(r[key] for r in per_rank) for key in
               ("peak_bytes", "wall_s", "loss_rel_diff", "grad_h_max_abs_diff", "grad_w_max_abs_diff")}
        res["local_logits_fp32_bytes"] = per_rank[0]["local_logits_fp32_bytes"]
        res["ratio_vs_full"] = full["peak_bytes"] / res["peak_bytes"]
        out["chunked"][str(chunk)] = res
    return out


def markdown(report: dict) -> str:
    cfg, s = report["config"], report["summary"]
    lines = [f"# Chunked loss: peak memory of the loss part, {cfg['vocab']} vocabulary",
             "",
             f"{cfg['tokens']} tokens, dim {cfg['dim']}, fp32, 1 thread, {report['machine']['cpu']}. "
             "Peak live tensor bytes (profiler allocator events) during the head + cross-entropy forward "
             "and backward, above the inputs. Command: `python benchmarks/chunked_loss.py`.",
             "",
             "| path | peak | x lower than full | wall s | loss rel. diff | grad h max diff | grad W max diff |",
             "|---|---|---|---|---|---|---|",
             f"| full fp32 logits ({mib(s['full']['logits_fp32_bytes'])} MiB of logits) | {mib(s['full']['peak_bytes'])} MiB "
             f"| 1.0 | {s['full']['wall_s']:.2f} | - | - | - |"]
    for chunk, r in s["chunked"].items():
        lines.append(f"| chunked, {chunk} tokens a chunk | {mib(r['peak_bytes'])} MiB | {r['ratio_vs_full']:.1f} "
                     f"| {r['wall_s']:.2f} | {r['loss_rel_diff']:.1e} | {r['grad_h_max_abs_diff']:.1e} "
                     f"| {r['grad_w_max_abs_diff']:.1e} |")
    lines += ["", "The chunked path forms each chunk's gradients in the forward while its logits exist "
              "(three head matmuls a chunk, as with full logits, none recomputed).", ""]
    t = s.get("tp")
    if t:
        tp = t["tp"]
        lines += [f"## Tensor parallel: tp{tp}, per rank", "",
                  f"{t['tokens']} tokens, dim {cfg['dim']}, {cfg['vocab']} vocabulary split by rows over {tp} gloo "
                  "ranks, fp32, 1 thread each; the largest peak over the ranks. Full: the head as "
                  "parallel/tensor_parallel.py shards it (ColwiseParallel, logits gathered replicated) and "
                  "F.cross_entropy; chunked: parallel/vocab_parallel_loss.py (chunk x vocab/tp logits a rank).", "",
                  "| path | peak a rank | x lower than full | wall s | loss rel. diff | grad h max diff | grad W max diff |",
                  "|---|---|---|---|---|---|---|",
                  f"| full logits gathered ({mib(t['full']['logits_fp32_bytes'])} MiB of fp32 logits a rank) "
                  f"| {mib(t['full']['peak_bytes'])} MiB | 1.0 | {t['full']['wall_s']:.2f} | - | - | - |"]
        for chunk, r in t["chunked"].items():
            lines.append(f"| vocabulary-parallel, {chunk} tokens a chunk ({mib(r['local_logits_fp32_bytes'])} MiB of "
                         f"logits a rank) | {mib(r['peak_bytes'])} MiB | {r['ratio_vs_full']:.1f} | {r['wall_s']:.2f} "
                         f"| {r['loss_rel_diff']:.1e} | {r['grad_h_max_abs_diff']:.1e} | {r['grad_w_max_abs_diff']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunks", default="256,1024")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks for the tp comparison (0: skip it)")
    p.add_argument("--tp-tokens", type=int, default=2048, help="tokens of the tp comparison (each rank holds "
                   "the full logits on the full path: kept below --tokens for this machine's memory)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    chunks = [int(c) for c in str(args.chunks).split(",")]
    started = time.perf_counter()
    summary = measure(args.tokens, args.dim, args.vocab, chunks)
    if args.tp > 1:
        summary["tp"] = measure_tp(args.tp, args.tp_tokens, args.dim, args.vocab, chunks)
    report = {"machine": machine_info(),
              "config": {"tokens": args.tokens, "dim": args.dim, "vocab": args.vocab, "chunks": chunks,
                         "precision": "fp32", "threads": 1, "memory_method": "profiler",
                         "tp": args.tp, "tp_tokens": args.tp_tokens},
              "summary": summary, "elapsed_s": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunked_loss.json").write_text(json.dumps(report, indent=2))
    (out / "chunked_loss.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

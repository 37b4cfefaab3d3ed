"""The attention kernel on one device, per backend: accuracy against fp64 and forward+backward speed.

    python benchmarks/attention_kernel.py [--device cuda] [--dtype bf16] [--lengths 4096,8192,...]
                                          [--heads 32] [--kv-heads 8] [--head-dim 128]
                                          [--accuracy-len 2048] [--dense-max-len 8192]
                                          [--repeats 10] [--no-plots] [--out DIR]
    python benchmarks/attention_kernel.py --from-json benchmarks/results/attention_kernel_cuda_bf16.json

This is the GPU half of the context-parallel benchmark: what one rank's blocks cost on the device
(`kernels/attention.py`), with each backend the kernel can choose. Two parts:

- `accuracy`: batch 2 x `--accuracy-len` tokens, GQA, per mask case (causal, full, an offset
  causal block as a ring step sees it, packed documents with a dense mask, packed documents cut
  into pieces) and backend (`torch`, `flash_attn` when installed; `auto`): out, dq, dk, dv against
  the fp64 reference on the same inputs, as relative error ||x - ref|| / ||ref||, and the same for
  plain `F.scaled_dot_product_attention` in the same dtype with a dense boolean mask (what one
  device computes without longtrain). `ratio` = our error / plain SDPA's; the bar is 2x, as in the
  bf16 context-parallel test. Padding queries are left out of out/dq (their rows have no keys).
- `speed`: one row of L tokens per length (batch 1; Llama-3-8B's attention by default: 32 query
  heads, 8 kv heads of 128), causal and packed (documents of 1 to L/4 tokens, one of length 1,
  a padded tail). Backends: `torch` (PyTorch's fused flash kernel; for packed rows one fused call
  per mask-free piece), `torch-dense` (packed rows through a dense mask and PyTorch's
  memory-efficient kernel, up to `--dense-max-len`: memory quadratic), `flash_attn` (flash-attn 2;
  packed rows through its varlen functions when the pieces are small, one call per piece
  otherwise: the kernel's own choice), and for packed rows that choice forced either way,
  `flash_attn-varlen` and `flash_attn-pieces`. Forward+backward time is the median of `--repeats`
  timed passes after 2 warm-ups (CUDA events on a GPU); TFLOP/s counts 4·heads·head_dim FLOPs per attended (q, k)
  pair forward and 2.5x that backward (the flash-attention convention), so causal and packed rows
  are comparable; peak memory is the allocator's high-water mark above the inputs (CUDA only).

Writes attention_kernel_<device>_<dtype>.json / .md / .png to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longtrain.kernels import attention as attn_kernel
from longtrain.kernels.attention import BlockMask, attention

HERE = Path(__file__).resolve().parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RATIO_BAR = 2.0


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def document_lengths(total: int, gen: torch.Generator) -> list[int]:
    """Documents of 1 to total/4 tokens (one of length 1) filling `total` minus a padded tail of
    about 1/32 of it."""
    fill = total - max(1, total // 32)
    lengths = [1]
    while sum(lengths) < fill:
        lengths.append(int(torch.randint(1, max(2, total // 4), (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - fill
    return [n for n in lengths if n > 0]


def packed_row(total: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, document ids) of one packed row; padding has id -1."""
    lengths = document_lengths(total, gen)
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(total - sum(lengths))])
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((total - sum(lengths),), -1)])
    return pos, doc


def make_case(case: str, batch: int, length: int, gen: torch.Generator, device) -> BlockMask:
    if case == "causal":
        return BlockMask(causal=True)
    if case == "full":
        return BlockMask(causal=False)
    if case == "offset":  # a ring step: this block's queries start a third of a block after its keys
        return BlockMask(causal=True, q_offset=length // 3, k_offset=0)
    rows = [packed_row(length, gen) for _ in range(batch)]
    pos, doc = (torch.stack([r[i] for r in rows]).to(device) for i in (0, 1))
    return BlockMask(causal=True, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc)


def attended_pairs(mask: BlockMask, batch: int, length: int) -> int:
    """(q, k) pairs the mask allows, counted per document without building the mask."""
    if mask.per_token:
        total = 0
        for row in mask.q_doc.cpu():
            _, counts = torch.unique_consecutive(row[row >= 0], return_counts=True)
            total += sum(int(n) * (int(n) + 1) // 2 for n in counts)
        return total
    if not mask.causal:
        return batch * length * length
    q = torch.arange(length) + mask.q_offset
    return batch * int((q - mask.k_offset + 1).clamp(0, length).sum())


def qkv(batch, length, heads, kv_heads, head_dim, dtype, device, gen):
    def draw(h):
        return torch.randn(batch, length, h, head_dim, generator=gen).to(device=device, dtype=dtype)

    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


@contextlib.contextmanager
def kernel_settings(dense_max: int | None = None, varlen: bool | None = None):
    """Force the dense-mask path (dense_max), or flash-attn's varlen call (varlen=True) or one call
    per piece (varlen=False) for packed pieces, for one run; None keeps the kernel's own choice."""
    saved = (attn_kernel.DENSE_MASK_MAX_ELEMENTS, attn_kernel.CPU_PIECE_CALL_ELEMENTS, attn_kernel._varlen_usable,
             attn_kernel._varlen_pays)
    if dense_max is not None:
        attn_kernel.DENSE_MASK_MAX_ELEMENTS = dense_max
        attn_kernel.CPU_PIECE_CALL_ELEMENTS = float("inf")  # on CPU too: no cheaper pieces below dense_max
    if varlen is False:
        attn_kernel._varlen_usable = lambda device, dtype: False
    if varlen is True:
        attn_kernel._varlen_pays = lambda pieces, batch, heads, head_dim: True
    try:
        yield
    finally:
        (attn_kernel.DENSE_MASK_MAX_ELEMENTS, attn_kernel.CPU_PIECE_CALL_ELEMENTS, attn_kernel._varlen_usable,
         attn_kernel._varlen_pays) = saved


def run_backend(backend: str, q, k, v, dout, mask: BlockMask, scale: float):
    """out, dq, dk, dv through the kernel's autograd entry."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, scale=scale, mask=mask, backend=backend)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def run_plain_sdpa(q, k, v, dout, mask: BlockMask, scale: float):
    """F.scaled_dot_product_attention in the inputs' dtype with a dense boolean mask; rows without
    a key attend themselves (their dout is zero, so they change nothing else)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    b, s_q, h, _ = q.shape
    allowed = mask.allowed(s_q, k.shape[1], q.device)
    allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.eye(s_q, k.shape[1], dtype=torch.bool,
                                                                    device=q.device))
    rep = h // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                         v.repeat_interleave(rep, 2).transpose(1, 2), attn_mask=allowed[:, None],
                                         scale=scale).transpose(1, 2)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor | None) -> float:
    got, ref = got.double(), ref.double()
    if rows is not None:
        got, ref = got[rows], ref[rows]
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def accuracy(args, device, dtype, backends) -> list[dict]:
    results = []
    gen = torch.Generator().manual_seed(0)
    scale = 1.0 / math.sqrt(args.head_dim)
    b, s = 2, args.accuracy_len
    for case in ("causal", "full", "offset", "packed-dense", "packed-pieces"):
        mask = make_case(case.split("-")[0], b, s, gen, device)
        q, k, v, dout = qkv(b, s, args.heads, args.kv_heads, args.head_dim, dtype, device, gen)
        rows = None
        if mask.per_token:
            rows = mask.q_doc >= 0
            dout = dout * rows[..., None, None].to(dtype)
        ref = run_backend("reference", *(t.double() for t in (q, k, v, dout)), mask, scale)
        plain = [rel_err(x, r, rows if i < 2 else None)
                 for i, (x, r) in enumerate(zip(run_plain_sdpa(q, k, v, dout, mask, scale), ref))]
        dense_max = None if case != "packed-pieces" else 0
        if case == "packed-dense":
            dense_max = b * s * s
        for backend in backends:
            with kernel_settings(dense_max=dense_max):
                got = run_backend(backend, q, k, v, dout, mask, scale)
            errs = [rel_err(x, r, rows if i < 2 else None) for i, (x, r) in enumerate(zip(got, ref))]
            ratio = max(e / max(p, 1e-30) for e, p in zip(errs, plain))
            results.append({"case": case, "backend": backend, "errors": dict(zip(("out", "dq", "dk", "dv"), errs)),
                            "plain_sdpa_errors": dict(zip(("out", "dq", "dk", "dv"), plain)), "ratio": ratio,
                            "ok": bool(ratio <= RATIO_BAR)})
            print(f"accuracy {case:14s} {backend:12s} out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} "
                  f"dv {errs[3]:.2e}  x plain SDPA {ratio:.2f}", flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------
def timed(fn, device, repeats: int) -> list[float]:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def speed_backends(case: str, length: int, args, flash: bool) -> list[str]:
    names = ["torch"]
    if case == "packed" and length <= args.dense_max_len:
        names.append("torch-dense")
    if flash:
        names.append("flash_attn")
        if case == "packed":
            names += ["flash_attn-varlen", "flash_attn-pieces"]
    return names


def speed(args, device, dtype, flash: bool) -> list[dict]:
    results = []
    scale = 1.0 / math.sqrt(args.head_dim)
    for length in args.lengths:
        for case in ("causal", "packed"):
            gen = torch.Generator().manual_seed(length)
            mask = make_case(case, 1, length, gen, device)
            q, k, v, dout = qkv(1, length, args.heads, args.kv_heads, args.head_dim, dtype, device, gen)
            pairs = attended_pairs(mask, 1, length)
            flops = 3.5 * 4 * args.heads * args.head_dim * pairs
            for name in speed_backends(case, length, args, flash):
                backend = name.split("-")[0]
                settings = {"torch-dense": {"dense_max": 1 << 62}, "flash_attn-varlen": {"varlen": True},
                            "flash_attn-pieces": {"varlen": False}}.get(name, {})
                row = {"case": case, "length": length, "backend": name, "pairs": pairs}
                try:
                    with kernel_settings(**settings):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                        times = timed(lambda: run_backend(backend, q, k, v, dout, mask, scale), device, args.repeats)
                    t = statistics.median(times)
                    row |= {"seconds": t, "seconds_all": times, "tflops": flops / t / 1e12}
                    if device.type == "cuda":
                        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - base
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                    torch.cuda.empty_cache()
                results.append(row)
                mem = row.get("peak_memory_bytes")
                print(f"speed {case:7s} {length:>7d} {name:18s} " + (
                    f"{row['seconds'] * 1e3:9.2f} ms  {row['tflops']:7.3g} TFLOP/s"
                    + (f"  peak {mem / 2 ** 30:.2f} GiB" if mem is not None else "")
                    if "seconds" in row else row["error"]), flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# Attention kernel on {report['device_name']} ({cfg['dtype']})", "",
             f"torch {report['torch_version']}, flash-attn {report['flash_attn_version'] or 'not installed'}; "
             f"heads {cfg['heads']}, kv heads {cfg['kv_heads']}, head dim {cfg['head_dim']}. "
             f"Command: `{report['command']}`", "",
             f"## Accuracy (batch 2 x {cfg['accuracy_len']}; relative error against fp64; ratio to plain SDPA "
             f"in {cfg['dtype']}, bar {RATIO_BAR:g}x)", "",
             "| case | backend | out | dq | dk | dv | plain SDPA out / dq / dk / dv | ratio | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["accuracy"]:
        e, p = r["errors"], r["plain_sdpa_errors"]
        lines.append(f"| {r['case']} | {r['backend']} | " + " | ".join(f"{e[n]:.2e}" for n in e)
                     + " | " + " / ".join(f"{p[n]:.1e}" for n in p) + f" | {r['ratio']:.2f} | "
                     + ("yes" if r["ok"] else "**no**") + " |")
    lines += ["", "## Forward+backward, one row (median ms; TFLOP/s over attended pairs; peak memory above inputs)",
              "", "| case | length | backend | ms | TFLOP/s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in report["speed"]:
        if "seconds" not in r:
            lines.append(f"| {r['case']} | {r['length']} | {r['backend']} | {r['error']} | | |")
            continue
        mem = r.get("peak_memory_bytes")
        lines.append(f"| {r['case']} | {r['length']} | {r['backend']} | {r['seconds'] * 1e3:.2f} | {r['tflops']:.3g} | "
                     + ("-" if mem is None else f"{mem / 2 ** 30:.2f}") + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from measure import length_axis, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    lengths = sorted({r["length"] for r in report["speed"]})
    for ax, case in zip(axes, ("causal", "packed")):
        rows = [r for r in report["speed"] if r["case"] == case and "tflops" in r]
        for name in dict.fromkeys(r["backend"] for r in rows):
            pts = [(r["length"], r["tflops"]) for r in rows if r["backend"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        length_axis(ax, lengths)
        ax.set_ylabel("forward+backward TFLOP/s")
        ax.set_title(f"{case} ({report['config']['dtype']}, {report['device_name']})")
        ax.legend()
    save_figure(fig, path, [], dpi=110)


def write_report(report: dict, out: Path, plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attention_kernel_{report['device']}_{report['config']['dtype']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    if plots and report["speed"]:
        plot(report, stem.with_suffix(".png"))
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--accuracy-len", type=int, default=2048)
    p.add_argument("--dense-max-len", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--from-json", default=None, help="re-render a report, no measuring")
    args = p.parse_args(argv)
    if args.from_json:
        write_report(json.loads(Path(args.from_json).read_text()), Path(args.out), not args.no_plots)
        return 0
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    flash = attn_kernel.flash_attn_available() and device.type == "cuda"
    backends = ["torch"] + (["flash_attn"] if flash else []) + ["auto"]
    version = None
    if flash:
        import flash_attn

        version = flash_attn.__version__
    report = {"device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch_version": torch.__version__, "flash_attn_version": version,
              "command": " ".join(["python benchmarks/attention_kernel.py"] + (argv if argv is not None else sys.argv[1:])),
              "config": {k: v for k, v in vars(args).items() if k != "from_json"},
              "accuracy": accuracy(args, device, dtype, backends),
              "speed": speed(args, device, dtype, flash)}
    write_report(report, Path(args.out), not args.no_plots)
    return 0 if all(r["ok"] for r in report["accuracy"]) else 1


if __name__ == "__main__":
    sys.exit(main())

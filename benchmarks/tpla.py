"""TPLA (tensor-parallel latent attention) against MLA: per-rank decode work and cache memory, and
the accuracy a user gives up.

    python benchmarks/tpla.py [--lengths 1024,...,32768] [--degrees 2,4] [--shapes v3] [--batch 1]
                              [--repeats 3] [--run RUN_DIR | --recipe YAML [overrides...]]
                              [--eval-seqs 4] [--eval-len 1024] [--prefill 64] [--preset tiny] [--out DIR]
    python benchmarks/tpla.py --from-json benchmarks/results/tpla.json   # re-render only

Part `decode` (one process, 1 thread, fp32): one layer's per-rank decode attention for one new
token against a cache of T tokens, as a rank of tp degree g runs it:
- `mla_tp{g}`: head-split tensor parallel: H/g heads, each over the whole cached latent
  (d_c + d_r per token: the cache is replicated on every rank);
- `tpla_g{g}`: TPLA: all H heads over this rank's latent slice (d_c/g + d_r per token).
Both compute absorbed attention (q through W_UK, scores over the cache, softmax, the latent
output through W_UV); the query/output projections (the same per token, and TPLA's are not
split) and the one all-reduce per layer (the same in both) are outside the timed region and
listed in the JSON. Per-rank cache bytes are the cache tensors' sizes. `--shapes v3` is
DeepSeek-V3's attention (128 heads, d_c 512, d_r 64, nope 128, v 128).

Part `gloo` (--gloo): the same decode step run for real over g local processes (gloo, 1 thread
each), as the ranks of a tp group: each rank runs its share (MLA: H/g heads over the whole cached
latent; TPLA: all H heads over its 1/g latent slice) and then the one all-reduce per layer of the
(batch, dim) output that both schemes need; the step time is the slowest rank's, best of
--repeats. The ranks share this machine's cores (g processes on 2 cores: contention counts).
The output projection W_O is left out as in part `decode` (TPLA's is not split by heads).

Part `accuracy`: a trained MLA model (`--run`, a longtrain run directory; its newest checkpoint)
on held-out sequences of the recipe's eval split: the first `--prefill` tokens prefilled (exact),
every later token decoded one per call through the caches (teacher-forced), negative
log-likelihood over the decoded positions -> perplexity, for exact MLA (absorbed) and TPLA at each
degree with the reparameterisation none / hadamard / pca (PCA calibrated on train-split batches),
latent RMSNorm exact; plus the logits' max |delta| and the top-1 agreement with exact MLA.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import MachineLoad, klen, length_axis, machine_info, save_figure  # noqa: E402

SHAPES = {
    "v3": dict(heads=128, d_c=512, d_r=64, nope=128, v=128),
    "tiny": dict(heads=8, d_c=64, d_r=16, nope=16, v=16),
}


# ----------------------------------------------------------------------------------------------
# decode: per-rank attention work
# ----------------------------------------------------------------------------------------------
def absorbed_step(q_nope, q_rope, cache_c, cache_r, w_uk, w_uv, scale):
    """One token's absorbed attention: q_nope (B, H, n), q_rope (B, H, r), cache (B, T, c) and
    (B, T, r), W_UK (H, n, c), W_UV (H, v, c) -> (B, H, v)."""
    q_lat = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)
    scores = (torch.bmm(q_lat, cache_c.transpose(1, 2)) + torch.bmm(q_rope, cache_r.transpose(1, 2))) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhc,hvc->bhv", torch.bmm(probs, cache_c), w_uv)


def decode_inputs(shape: dict, scheme: str, g: int, length: int, batch: int, seed: int = 0, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple:
    """One rank's absorbed_step inputs (and its heads, latent width, scale): head-split MLA holds H/g
    heads over the whole latent, TPLA all H heads over d_c/g of it."""
    h, d_c, d_r, n, v = shape["heads"], shape["d_c"], shape["d_r"], shape["nope"], shape["v"]
    heads, width = (h // g, d_c) if scheme == "mla" else (h, d_c // g)
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    cache_c = randn(batch, length, width)
    cache_r = randn(batch, length, d_r)
    q_nope, q_rope = randn(batch, heads, n), randn(batch, heads, d_r)
    w_uk, w_uv = randn(heads, n, width), randn(heads, v, width)
    return (q_nope, q_rope, cache_c, cache_r, w_uk, w_uv, (n + d_r) ** -0.5), heads, width


def decode_case(shape: dict, scheme: str, g: int, length: int, batch: int, repeats: int,
                device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    d_r, n, v = shape["d_r"], shape["nope"], shape["v"]
    inputs, heads, width = decode_inputs(shape, scheme, g, length, batch, 0, device, dtype)
    q_nope, q_rope, cache_c, cache_r, w_uk, w_uv, scale = inputs
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    absorbed_step(q_nope, q_rope, cache_c, cache_r, w_uk, w_uv, scale)  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        absorbed_step(q_nope, q_rope, cache_c, cache_r, w_uk, w_uv, scale)
        sync()
        times.append(time.perf_counter() - start)
    flops = 2 * batch * heads * (n * width + length * (width + d_r) + length * width + width * v)
    return {"scheme": scheme, "g": g, "length": length, "best_s": min(times), "median_s": sorted(times)[len(times) // 2],
            "cache_bytes_per_rank": cache_c.nbytes + cache_r.nbytes, "heads_per_rank": heads,
            "latent_width_per_rank": width, "flops": flops}


def run_decode(args) -> list[dict]:
    torch.set_num_threads(1)
    shape = SHAPES[args.shapes]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = []
    for length in args.lengths:
        for g in [1] + args.degrees:
            for scheme in (["mla"] if g == 1 else ["mla", "tpla"]):
                row = decode_case(shape, scheme, g, length, args.batch, args.repeats, args.device, dtype)
                rows.append(row)
                print(f"decode {scheme:4s} g={g} T={klen(length):>4s}: {row['best_s'] * 1e3:8.2f} ms  "
                      f"cache/rank {row['cache_bytes_per_rank'] / 2 ** 20:7.2f} MiB", flush=True)
    return rows


def gloo_rank(shape: dict, lengths: list[int], batch: int, repeats: int, dim: int) -> list[dict]:
    """One rank of a gloo group of g = world size: per length and scheme, the decode step (this
    rank's attention share + the all-reduce of the (batch, dim) layer output); rank 0's rows."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    g, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for length in lengths:
        for scheme in ("mla", "tpla"):
            inputs, heads, width = decode_inputs(shape, scheme, g, length, batch, seed=rank)
            q_nope, q_rope, cache_c, cache_r, w_uk, w_uv, scale = inputs
            out = torch.zeros(batch, dim)
            times, reduce_times = [], []
            for rep in range(repeats + 1):  # the first is a warm-up
                dist.barrier()
                start = time.perf_counter()
                absorbed_step(q_nope, q_rope, cache_c, cache_r, w_uk, w_uv, scale)
                computed = time.perf_counter()
                dist.all_reduce(out)
                elapsed = torch.tensor([time.perf_counter() - start, time.perf_counter() - computed],
                                       dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if rep:
                    times.append(float(elapsed[0]))
                    reduce_times.append(float(elapsed[1]))
            rows.append({"scheme": scheme, "g": g, "length": length, "best_s": min(times),
                         "median_s": sorted(times)[len(times) // 2], "all_reduce_s": min(reduce_times),
                         "cache_bytes_per_rank": cache_c.nbytes + cache_r.nbytes, "heads_per_rank": heads,
                         "latent_width_per_rank": width})
            del cache_c, cache_r
    return rows


def run_gloo(args) -> list[dict]:
    from longtrain.tests.distributed import run_group

    shape = SHAPES[args.shapes]
    rows = []
    for g in args.degrees:
        got = run_group(g, gloo_rank, shape, args.lengths, args.batch, args.repeats, args.gloo_dim)
        for row in got:
            print(f"gloo {row['scheme']:4s} g={g} T={klen(row['length']):>4s}: {row['best_s'] * 1e3:8.2f} ms "
                  f"(all-reduce {row['all_reduce_s'] * 1e3:.2f} ms)", flush=True)
        rows += got
    return rows


# ----------------------------------------------------------------------------------------------
# accuracy: a trained model's perplexity under TPLA
# ----------------------------------------------------------------------------------------------
def run_accuracy(args) -> dict:
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.evaluate import evaluate
    from longtrain.launcher.generate import load_model

    torch.set_num_threads(1)
    recipe = load_recipe(Path(args.run) / "recipe.yaml" if args.run else Path(args.recipe), args.overrides)
    model = load_model(recipe, log=lambda m: print(m, flush=True))
    lengths = [int(x) for x in str(args.retrieval_lengths).split(",")]
    rows = evaluate(model, recipe, args.degrees, args.rotations, args.eval_seqs, args.eval_len, args.prefill, lengths,
                    log=lambda m: print("accuracy " + m, flush=True))
    if args.finetuned_run:  # a TPLA-aware fine-tune of the same model (model.tpla_degree = g in its recipe)
        tuned_recipe = load_recipe(Path(args.finetuned_run) / "recipe.yaml")
        tuned = load_model(tuned_recipe, log=lambda m: print(m, flush=True))
        for row in evaluate(tuned, tuned_recipe, [tuned.cfg.tpla_degree], ["none"], args.eval_seqs, args.eval_len,
                            args.prefill, lengths, log=lambda m: print("accuracy finetuned " + m, flush=True)):
            rows.append(dict(row, variant=row["variant"] + "_finetuned"))
    cfg = model.cfg
    return {"model": {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                                                    "qk_rope_head_dim", "v_head_dim")},
            "params": cfg.num_params(), "source": args.run or args.recipe, "finetuned": args.finetuned_run,
            "eval_seqs": args.eval_seqs, "eval_len": args.eval_len, "prefill": args.prefill,
            "retrieval_lengths": lengths, "rows": rows}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def summarize(decode_rows: list[dict], degrees: list[int]) -> dict:
    by = {(r["scheme"], r["g"], r["length"]): r for r in decode_rows}
    out = {}
    for g in degrees:
        for length in sorted({r["length"] for r in decode_rows}):
            mla, tpla = by.get(("mla", g, length)), by.get(("tpla", g, length))
            if mla and tpla:
                out[f"g{g}_{length}"] = {"speedup_tpla_vs_mla": mla["best_s"] / tpla["best_s"],
                                         "cache_ratio_tpla_vs_mla": tpla["cache_bytes_per_rank"] /
                                         mla["cache_bytes_per_rank"]}
    return out


def write_report(report: dict, out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows, degrees = report["decode"], report["config"]["degrees"]
    lengths = sorted({r["length"] for r in rows})
    lines = ["# TPLA vs MLA decode", "",
             f"Machine: {report['machine']['cpu']} ({report['machine']['cpu_count']} cores, shared; others used "
             f"{(report.get('other_processes_cpu_share') or 0) * 100:.0f}% of the CPU during the run), torch "
             f"{report['machine']['torch_version']}, {report['config'].get('device', 'cpu')} "
             f"{report['config'].get('precision', 'fp32')}, 1 thread, batch {report['config']['batch']}, attention "
             f"shapes `{report['config']['shapes']}` {SHAPES[report['config']['shapes']]}.", "",
             "Per-rank decode attention for one token against T cached tokens (best of "
             f"{report['config']['repeats']}); cache MiB per rank per layer.", "",
             "| T | " + " | ".join(f"MLA tp{g} ms | TPLA g{g} ms | speedup | cache MLA / TPLA MiB" for g in degrees) + " |",
             "|---|" + "---|---|---|---|" * len(degrees)]
    by = {(r["scheme"], r["g"], r["length"]): r for r in rows}
    for length in lengths:
        cells = []
        for g in degrees:
            m, t = by[("mla", g, length)], by[("tpla", g, length)]
            cells.append(f"{m['best_s'] * 1e3:.2f} | {t['best_s'] * 1e3:.2f} | {m['best_s'] / t['best_s']:.2f}x | "
                         f"{m['cache_bytes_per_rank'] / 2 ** 20:.2f} / {t['cache_bytes_per_rank'] / 2 ** 20:.2f}")
        lines.append(f"| {klen(length)} | " + " | ".join(cells) + " |")
    gloo = report.get("gloo")
    if gloo:
        gby = {(r["scheme"], r["g"], r["length"]): r for r in gloo}
        glengths = sorted({r["length"] for r in gloo})
        lines += ["", "## Real processes (gloo)", "",
                  f"The decode step over g local processes (1 thread each, sharing this machine's cores): each rank's "
                  f"attention share, then the all-reduce of the (batch, {report['config'].get('gloo_dim')}) layer "
                  f"output; slowest rank, best of {report['config']['repeats']}.", "",
                  "| T | " + " | ".join(f"MLA tp{g} ms | TPLA g{g} ms | speedup" for g in degrees) + " |",
                  "|---|" + "---|---|---|" * len(degrees)]
        for length in glengths:
            cells = []
            for g in degrees:
                m, t = gby[("mla", g, length)], gby[("tpla", g, length)]
                cells.append(f"{m['best_s'] * 1e3:.2f} | {t['best_s'] * 1e3:.2f} | {m['best_s'] / t['best_s']:.2f}x")
            lines.append(f"| {klen(length)} | " + " | ".join(cells) + " |")
    acc = report.get("accuracy")
    if acc:
        lines += ["", "## Accuracy", "",
                  f"Model: {acc['model']} ({acc['params'] / 1e6:.2f}M parameters) from `{acc['source']}`; "
                  f"{acc['eval_seqs']} held-out sequences of {acc['eval_len']} tokens, {acc['prefill']} prefilled, the "
                  "rest decoded one token per call through the caches (teacher-forced).", "",
                  "Retrieval: a 6-character key stated at depth 0.1/0.5/0.9 of held-out filler, asked again at the "
                  "end; share of key tokens predicted (teacher-forced), per context length.", "",
                  "| variant | rotation | perplexity | max abs logit delta vs MLA | top-1 agreement with MLA | retrieval |",
                  "|---|---|---|---|---|---|"]
        for r in acc["rows"]:
            ret = ", ".join(f"{klen(n)}: {v:.2f}" for n, v in r["retrieval"].items())
            lines.append(f"| {r['variant']} | {r['rotation']} | {r['ppl']:.4f} | {r['max_abs_logit_delta']:.3g} | "
                         f"{r['top1_agree']:.4f} | {ret} |")
    lines += ["", report.get("notes", "")]
    (out / "tpla.md").write_text("\n".join(lines) + "\n")
    (out / "tpla.json").write_text(json.dumps(report, indent=2))
    if not plots:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g in [1] + degrees:
        for scheme in (["mla"] if g == 1 else ["mla", "tpla"]):
            pts = [by[(scheme, g, x)] for x in lengths]
            label = f"MLA tp{g} (head split)" if scheme == "mla" else f"TPLA g{g}"
            style = "-" if scheme == "mla" else "--"
            axes[0].plot(lengths, [p["best_s"] * 1e3 for p in pts], style, marker="o", label=label)
            axes[1].plot(lengths, [p["cache_bytes_per_rank"] / 2 ** 20 for p in pts], style, marker="o", label=label)
    for ax, ylabel in zip(axes, ("per-rank decode attention (ms)", "per-rank latent cache (MiB, one layer)")):
        length_axis(ax, lengths)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    save_figure(fig, out / "tpla_decode.png", names, 110)
    if report.get("gloo"):
        gby = {(r["scheme"], r["g"], r["length"]): r for r in report["gloo"]}
        glengths = sorted({r["length"] for r in report["gloo"]})
        fig, ax = plt.subplots(figsize=(6, 4))
        for g in degrees:
            for scheme in ("mla", "tpla"):
                label = f"MLA tp{g} (head split)" if scheme == "mla" else f"TPLA g{g}"
                ax.plot(glengths, [gby[(scheme, g, x)]["best_s"] * 1e3 for x in glengths],
                        "-" if scheme == "mla" else "--", marker="o", label=label)
        length_axis(ax, glengths)
        ax.set_yscale("log")
        ax.set_ylabel("decode step over gloo ranks (ms, slowest rank)")
        ax.legend(fontsize=7)
        save_figure(fig, out / "tpla_gloo.png", names, 110)
    if acc:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['variant']}\n{r['rotation']}" for r in acc["rows"]]
        ax.bar(range(len(labels)), [r["ppl"] for r in acc["rows"]])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("held-out perplexity (decoded)")
        low = min(r["ppl"] for r in acc["rows"])
        ax.set_ylim(low * 0.95, max(r["ppl"] for r in acc["rows"]) * 1.02)
        save_figure(fig, out / "tpla_accuracy.png", names, 110)
    report["plots"] = names
    (out / "tpla.json").write_text(json.dumps(report, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--degrees", default="2,4")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="v3")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the per-rank decode kernel runs (cuda: one GPU stands for one rank)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--run", default=None, help="a trained longtrain run directory (accuracy part)")
    p.add_argument("--recipe", default=None, help="or a recipe (with overrides) for the accuracy part")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--finetuned-run", default=None, help="a TPLA-aware fine-tune of --run (model.tpla_degree set)")
    p.add_argument("--rotations", default="none,hadamard,pca")
    p.add_argument("--eval-seqs", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--retrieval-lengths", default="1024")
    p.add_argument("--preset", choices=["tiny"], default=None, help="tiny: a seconds-long smoke run")
    p.add_argument("--gloo", action="store_true", help="also time the decode step over g real gloo processes")
    p.add_argument("--gloo-dim", type=int, default=7168, help="--gloo: the model dim of the all-reduced output")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--from-json", default=None)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--note", default="", help="a line about the model's training, for the report")
    args = p.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        write_report(report, Path(args.out), plots=not args.no_plots)
        return 0
    if args.preset == "tiny":
        args.lengths, args.shapes, args.repeats, args.gloo_dim = "256,512", "tiny", 2, 64
        args.eval_seqs, args.eval_len, args.prefill, args.retrieval_lengths = 1, 48, 16, "96"
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.degrees = [int(x) for x in args.degrees.split(",")]
    args.rotations = args.rotations.split(",")
    load = MachineLoad()
    started = time.time()
    report = {"machine": machine_info(),
              "config": {"lengths": args.lengths, "degrees": args.degrees, "shapes": args.shapes, "batch": args.batch,
                         "repeats": args.repeats, "precision": args.dtype, "device": args.device, "threads": 1,
                         "gloo_dim": args.gloo_dim},
              "decode": run_decode(args)}
    report["summary"] = summarize(report["decode"], args.degrees)
    if args.gloo:
        report["gloo"] = run_gloo(args)
        report["gloo_summary"] = summarize(report["gloo"], args.degrees)
    if args.run or args.recipe:
        report["accuracy"] = run_accuracy(args)
    report["elapsed_s"] = time.time() - started
    report["other_processes_cpu_share"] = load.other_share()
    report["notes"] = (args.note + "\n\n" if args.note else "") + NOTES
    write_report(report, Path(args.out), plots=not args.no_plots)
    print(f"wrote {Path(args.out) / 'tpla.json'}", flush=True)
    return 0


NOTES = """Notes. TPLA's claim is about memory traffic: a GPU decode step is bound by reading the KV
cache, and TPLA reads (d_c/g + d_r) values per token and rank instead of (d_c + d_r). Here each
rank's work is measured on one CPU core in fp32, where the kernel is closer to compute-bound:
TPLA runs g x the heads of head-split TP on 1/g of the latent, so its FLOPs per rank are about
(H (2 d_c/g + d_r)) / ((H/g)(2 d_c + d_r)) of MLA's (more than 1 when d_r is large relative to
d_c/g). Not measured here: TPLA's query/output projections are not split (g x the weight reads of
head-split TP per rank), and the all-reduce per layer (the same in both)."""

if __name__ == "__main__":
    sys.exit(main())

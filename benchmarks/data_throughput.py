"""Data pipeline throughput: read + tokenize + pack, against what training consumes.

    python benchmarks/data_throughput.py [--seconds 8] [--seq-len 4096] [--batch-size 8] [--out DIR]

Measured on this machine (tokens/s that the loader hands to the trainer, after warmup):

1. `inline`: the loader's work in the calling process (data.num_workers=0): read, tokenize, pack and
   collate — what one worker process does, without the hand-over.
2. `workers=1` (the default data.num_workers) and `workers=2`: background processes; the
   consumer pulls batches as fast as it can.
Each for jsonl + sentencepiece (a 4096-piece model trained here on the built-in corpus exported as
jsonl, the debug_spm_cpu recipe's data) and builtin + bytes; packing concat.
3. Balanced steps (`parallel.balance`, launcher/balanced_batches.py) from jsonl + sentencepiece, one
   rank of a cp4 group with a simulated device step (--balance-step-s): the stall per step (time in
   next()) made inline with a cold token-length index (this rank tokenizes every length: no group
   here to share them), inline with the warm index, and ahead in a worker process (data.num_workers=1).
4. The first pass (cold token-length index) of balanced steps in a group: 4 gloo ranks laid out as
   tp2 x cp2 by parallel/mesh.py (balancing groups {0, 2} and {1, 3}), inline, side by side: the
   lengths learned per balancing group with the tokens of a rank's share dropped (as before; every
   length tokenized once per tp slice, a held document of the share tokenized again) against the
   lengths learned by the whole world with those tokens kept (each length tokenized once over the job,
   no document twice on a rank), and the two changes alone; and the same file streamed through
   `datasets` (format hf_jsonl, a sequential source), its lengths learned by the world against each
   rank tokenizing every document it packs (as before). Per rank: the first step (it learns the
   packer's lookahead), the time in next() over --group-steps steps, documents tokenized.

Compared with:
- the trainer's consumption for the debug model on this machine: `Trainer.train_step` on one
  process (seq_len 256, batch 8), tokens/s measured here;
- the computed consumption of one 8-GPU node training a 1B model (llama-1b) at 32K context at 40%
  MFU: tokens/s = 0.4 x 8 x peak / FLOPs per token, FLOPs per token = 6 x parameters (non-embedding
  + head) + the causal attention term (models/transformer.py), peak = 989 TFLOP/s (H100 bf16 dense).
  Per rank the loader must produce its data rank's share: node/8 with dp=8; the whole node's rate
  when the 8 GPUs are cp (or tp) peers of one data rank, since each peer builds the same batch.

Writes data_throughput.json and data_throughput.md to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
H100_PEAK = 989e12


def measure_loader(cfg, seconds: float, warmup_batches: int = 2) -> dict:
    from longtrain.data.loader import build_loader

    started = time.perf_counter()
    loader = build_loader(cfg, dp_rank=0, dp_degree=1, seed=0)
    batches = 0
    try:
        for _ in range(warmup_batches):
            next(loader)
        first = time.perf_counter() - started
        tokens, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = next(loader)
            tokens += int((batch["doc_ids"] >= 0).sum())
            batches += 1
        elapsed = time.perf_counter() - t0
    finally:
        loader.close()
    return {"tokens_per_second": tokens / elapsed, "batches": batches, "seconds": elapsed,
            "startup_seconds": first}


class _Engine:
    """Stands in for the balance attention engine (the loader hands it each step's layout)."""

    def __init__(self, global_ranks=None):
        self.global_ranks = global_ranks  # the balancing group's global ranks (in a process group)

    def set_step(self, layout) -> None:
        self.layout = layout


def measure_balanced(source: str, tokenizer: str, workers: int, seconds: float, step_s: float,
                     budget: int, min_steps: int = 3) -> dict:
    """One rank (rank 0 of a cp4 balancing group, 4 bins of `budget` tokens a step) taking balanced
    steps from launcher/balanced_batches.py while a simulated device step of `step_s` seconds runs
    (a sleep: the host is free, as while a GPU computes). The stall is the time next() takes: the
    data work the trainer waits for. Lengths come from the token-length index in $LONGTRAIN_CACHE
    (cold on the first run over a cache directory, warm after)."""
    from longtrain.launcher.balanced_batches import BalancedBatches
    from longtrain.launcher.config import load_recipe
    from longtrain.models.sizes import resolve_model_config

    recipe = load_recipe(None, ["model.name=tiny", f"model.max_seq_len={budget}", f"data.source={source}",
                                f"data.tokenizer={tokenizer}", "data.packing=varlen", f"data.seq_len={budget}",
                                f"data.token_budget={budget}", f"data.max_doc_len={budget}",
                                f"data.num_workers={workers}", "data.prefetch=2", "parallel.cp=4",
                                "parallel.balance=zeppelin", "parallel.balance_bins=4", "cluster.preset=local",
                                "run.launch.nproc_per_node=4"])
    started = time.perf_counter()
    batches = BalancedBatches(recipe, "zeppelin", _Engine(), 0, 4, dp=1, model_cfg=resolve_model_config(recipe.model))
    stalls, tokens = [], 0
    try:
        next(batches)  # the first step includes starting the producer (and the worker)
        first = time.perf_counter() - started
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(stalls) < min_steps:
            time.sleep(step_s)
            s0 = time.perf_counter()
            batch = next(batches)
            stalls.append(time.perf_counter() - s0)
            tokens += batch["tokens"].numel()
        elapsed = time.perf_counter() - t0
    finally:
        batches.close()
    stalls_sorted = sorted(stalls)
    return {"steps": len(stalls), "step_s": step_s, "stall_mean_s": sum(stalls) / len(stalls),
            "stall_p90_s": stalls_sorted[int(0.9 * (len(stalls) - 1))], "startup_seconds": first,
            "rank_tokens_per_second": tokens / elapsed, "docs_tokenized": batches.docs_tokenized,
            "docs_read": batches.docs_read}


# label, lengths learned by the world (else per balancing group), tokens of the share kept, the source
# streamed (format hf_jsonl: sequential), a streamed source's lengths learned with the group
GROUP_VARIANTS = (
    ("before: per balancing group, share's tokens dropped", False, False, False, True),
    ("per balancing group, share's tokens kept", False, True, False, True),
    ("world, share's tokens dropped", True, False, False, True),
    ("after: world, share's tokens kept", True, True, False, True),
    ("streamed, before: every rank tokenizes what it packs", True, True, True, False),
    ("streamed, after: world, share's tokens kept", True, True, True, True),
)
BEFORE_AFTER = {"file": (0, 3), "streamed": (4, 5)}  # GROUP_VARIANTS compared


def balanced_group_pass(source: str, tokenizer: str, budget: int, steps: int, step_s: float, cache: str,
                        repeats: int) -> dict:
    """On every rank of a 4-rank gloo group (tp2 x cp2 as the trainer's mesh lays it out): per variant of
    GROUP_VARIANTS, a cold index (its own cache directory), balanced steps inline with a simulated
    device step of `step_s` (a sleep) before each but the first; every rank's first-step time, time in
    next() over `steps` steps and tokenization counters, gathered to every rank. `repeats` rounds, the
    variants in turn within each (so the machine's load falls alike on all)."""
    import torch.distributed as dist

    from longtrain.launcher.balanced_batches import BalancedBatches
    from longtrain.launcher.config import load_recipe
    from longtrain.models.sizes import resolve_model_config
    from longtrain.parallel.mesh import Mesh, ParallelDims

    world = dist.get_world_size()
    mesh = Mesh(ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=2, tp=2), "cpu")
    group = dist.get_process_group_ranks(mesh["loss"].get_group())
    out: dict = {"groups": [None] * world, "runs": {variant[0]: [] for variant in GROUP_VARIANTS}}
    dist.all_gather_object(out["groups"], group)
    for n, (label, by_world, keep, streamed, share) in [(n, v) for _ in range(repeats)
                                                        for n, v in enumerate(GROUP_VARIANTS)]:
        os.environ["LONGTRAIN_CACHE"] = os.path.join(cache, f"group-{n}-{len(out['runs'][label])}")
        data = (f"data.sources=[{{path: {source}, format: hf_jsonl}}]" if streamed else f"data.source={source}")
        recipe = load_recipe(None, ["model.name=tiny", f"model.max_seq_len={budget}", data,
                                    f"data.tokenizer={tokenizer}", "data.packing=varlen", f"data.seq_len={budget}",
                                    f"data.token_budget={budget}", f"data.max_doc_len={budget}", "data.num_workers=0",
                                    "parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=false",
                                    "parallel.balance=zeppelin", "parallel.balance_bins=4", "cluster.preset=local",
                                    f"run.launch.nproc_per_node={world}"])
        batches = BalancedBatches(recipe, "zeppelin", _Engine(group), mesh.local_rank("loss"), len(group), dp=1,
                                  model_cfg=resolve_model_config(recipe.model), tp=2,
                                  length_ranks=list(range(world)) if by_world else None)
        batches.maker.keep_length_tokens = keep
        batches.maker.share_stream_lengths = share
        dist.barrier()
        t0 = time.perf_counter()
        next(batches)
        first = time.perf_counter() - t0
        data = first
        for _ in range(steps - 1):
            time.sleep(step_s)
            s0 = time.perf_counter()
            next(batches)
            data += time.perf_counter() - s0
        mine = {"first_step_s": first, "data_s": data, "docs_tokenized": batches.docs_tokenized,
                "lengths_tokenized": batches.lengths_tokenized, "lengths_reused": batches.lengths_reused,
                "docs_read": batches.docs_read, "exchange_size": batches.exchange.size if batches.exchange else 1}
        batches.close()
        ranks: list = [None] * world
        dist.all_gather_object(ranks, mine)
        out["runs"][label].append(ranks)
        dist.barrier()
    return out


def measure_balanced_group(source: str, tokenizer: str, budget: int, steps: int, step_s: float, cache: str,
                           repeats: int = 3) -> dict:
    """balanced_group_pass on 4 local gloo ranks; per variant the median over repeats of the slowest
    rank's first step and of the mean rank's time in next(); the counts (the same in every repeat)."""
    import statistics

    from longtrain.tests.distributed import run_group

    result = run_group(4, balanced_group_pass, source, tokenizer, budget, steps, step_s, cache, repeats)
    for label, rounds in result["runs"].items():
        ranks = rounds[0]
        result["runs"][label] = {
            "ranks": ranks, "repeats": len(rounds),
            **{f"{key}_sum": sum(r[key] for r in ranks) for key in ("docs_tokenized", "lengths_tokenized", "lengths_reused")},
            "first_step_s_max": statistics.median(max(r["first_step_s"] for r in rr) for rr in rounds),
            "data_s_mean": statistics.median(sum(r["data_s"] for r in rr) / len(rr) for rr in rounds),
            "same_counts_every_repeat": all([r["docs_tokenized"] for r in rr] == [r["docs_tokenized"] for r in ranks]
                                            for rr in rounds)}
    result["ratio_before_after"] = {}
    for kind, pair in BEFORE_AFTER.items():
        before, after = (result["runs"][GROUP_VARIANTS[i][0]] for i in pair)
        result["ratio_before_after"][kind] = {
            key: before[key] / after[key] if after[key] and before[key] else None  # none before: no ratio
            for key in ("first_step_s_max", "data_s_mean", "docs_tokenized_sum", "lengths_tokenized_sum")}
    result.update(budget=budget, steps=steps, step_s=step_s, repeats=repeats)
    return result


def measure_trainer(steps: int = 6) -> float:
    """Trainer.train_step tokens/s for the debug model, one process, batches fetched beforehand."""
    import torch

    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    torch.set_num_threads(1)
    recipe = load_recipe(HERE.parent / "configs" / "debug_cpu.yaml",
                         ["parallel.tp=1", "run.launch.nproc_per_node=1", "run.tensorboard=false",
                          "run.progress=false", f"run.dir={tempfile.mkdtemp()}"])
    trainer = Trainer(recipe)
    batches = [next(trainer.loader) for _ in range(steps + 2)]
    for b in batches[:2]:
        trainer.train_step(b)
    t0 = time.perf_counter()
    for b in batches[2:]:
        trainer.train_step(b)
    elapsed = time.perf_counter() - t0
    import torch.distributed as dist

    dist.destroy_process_group()
    return steps * recipe.data.batch_size * recipe.data.seq_len / elapsed


def node_consumption(seq_len: int = 32768, mfu: float = 0.4, gpus: int = 8) -> dict:
    from longtrain.models.sizes import SIZES

    cfg = SIZES["llama-1b"]
    flops = cfg.flops_per_token(seq_len)
    tokens = mfu * gpus * H100_PEAK / flops
    return {"model": "llama-1b", "parameters": cfg.num_params(), "seq_len": seq_len, "mfu": mfu, "gpus": gpus,
            "peak_flops_per_gpu": H100_PEAK, "flops_per_token": flops, "node_tokens_per_second": tokens,
            "per_rank_dp8": tokens / gpus, "per_rank_cp8": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--balance-step-s", type=float, default=0.2,
                        help="the simulated device step of the balanced-batch rows (seconds)")
    parser.add_argument("--group-steps", type=int, default=12,
                        help="steps of the cold first pass in the 4-rank tp2 x cp2 group (0: skip it)")
    parser.add_argument("--group-repeats", type=int, default=3, help="rounds of the group's variants (median)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from longtrain.data.inspect import export_builtin, iter_texts
    from longtrain.data.tokenizers import train_sentencepiece

    work = Path(tempfile.mkdtemp(prefix="longtrain-data-bench-"))
    export_builtin(str(work / "jsonl"))
    train_sentencepiece(iter_texts([str(work / "jsonl")]), 4096, str(work / "spm.model"))

    from longtrain.data.config import DataConfig

    base = dict(sources=[], text_field="text", seq_len=args.seq_len, batch_size=args.batch_size,
                packing="concat", lanes=0)
    corpora = {
        "jsonl + sentencepiece": dict(source=str(work / "jsonl"), tokenizer=str(work / "spm.model")),
        "builtin + bytes": dict(source="builtin", tokenizer="bytes"),
    }
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
               "settings": {"seq_len": args.seq_len, "batch_size": args.batch_size, "packing": "concat",
                            "seconds": args.seconds}, "loader": {}}
    for name, corpus in corpora.items():
        results["loader"][name] = {}
        for label, workers in (("inline (one worker's work)", 0), ("workers=1 (default)", 1), ("workers=2", 2)):
            cfg = DataConfig(**base, **corpus, num_workers=workers, prefetch=4)
            results["loader"][name][label] = measure_loader(cfg, args.seconds)
            print(f"{name:24s} {label:28s} {results['loader'][name][label]['tokens_per_second']:>14,.0f} tokens/s",
                  flush=True)
    # balanced steps (parallel.balance): inline vs ahead in a worker, cold vs warm token-length index
    os.environ["LONGTRAIN_CACHE"] = str(work / "cache")  # this run's own index (cold on its first pass)
    spm = corpora["jsonl + sentencepiece"]
    results["balanced"] = {"budget": args.seq_len, "step_s": args.balance_step_s, "runs": {}}
    for label, workers in (("inline, cold index", 0), ("inline, warm index", 0), ("worker=1, warm index", 1)):
        m = measure_balanced(spm["source"], spm["tokenizer"], workers, args.seconds, args.balance_step_s,
                             args.seq_len)
        results["balanced"]["runs"][label] = m
        print(f"balanced {label:24s} stall {m['stall_mean_s'] * 1e3:8.1f} ms/step (p90 {m['stall_p90_s'] * 1e3:.1f}), "
              f"first step {m['startup_seconds']:.2f} s, {m['docs_tokenized']} documents tokenized over "
              f"{m['steps'] + 1} steps", flush=True)
    if args.group_steps:
        g = results["balanced_group"] = measure_balanced_group(spm["source"], spm["tokenizer"], args.seq_len,
                                                               args.group_steps, args.balance_step_s, str(work / "cache"),
                                                               args.group_repeats)
        for label, m in g["runs"].items():
            print(f"balanced group {label:52s} first step {m['first_step_s_max']:.2f} s, next() {m['data_s_mean']:.2f} s, "
                  f"{m['docs_tokenized_sum']} documents tokenized ({m['lengths_tokenized_sum']} for lengths)", flush=True)
    results["trainer_debug_tokens_per_second"] = None if args.skip_trainer else measure_trainer()
    results["node_1b_32k"] = node = node_consumption()

    spm_one = results["loader"]["jsonl + sentencepiece"]["inline (one worker's work)"]["tokens_per_second"]
    need = {key: math.ceil(node[key] / spm_one) for key in ("per_rank_dp8", "per_rank_cp8")}
    results["workers_needed_sentencepiece"] = need

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_throughput.json").write_text(json.dumps(results, indent=2))
    md = render(results)
    (out / "data_throughput.md").write_text(md)
    print(md)
    return 0


def render(r: dict) -> str:
    node = r["node_1b_32k"]
    trainer = r["trainer_debug_tokens_per_second"]
    lines = ["# Data throughput: read + tokenize + pack vs training consumption", "",
             f"Packing concat, seq_len {r['settings']['seq_len']}, batch {r['settings']['batch_size']} rows; "
             f"tokens/s handed to the consumer over {r['settings']['seconds']:.0f} s after 2 warmup batches.", "",
             "| corpus | loader | tokens/s | startup s |", "|---|---|---|---|"]
    for name, rows in r["loader"].items():
        for label, m in rows.items():
            lines.append(f"| {name} | {label} | {m['tokens_per_second']:,.0f} | {m['startup_seconds']:.1f} |")
    lines += ["", "| consumer | tokens/s | loader keeps ahead? |", "|---|---|---|"]
    spm = r["loader"]["jsonl + sentencepiece"]
    one = spm["inline (one worker's work)"]["tokens_per_second"]
    default = spm["workers=1 (default)"]["tokens_per_second"]
    if trainer:
        lines.append(f"| debug model, Trainer.train_step, 1 process on this machine | {trainer:,.0f} | "
                     f"{'yes' if default > trainer else 'no'}: default loader {default / trainer:,.0f}x |")
    need = r["workers_needed_sentencepiece"]
    lines.append(f"| 1B at 32K, 40% MFU, 8 x H100 node: whole node | {node['node_tokens_per_second']:,.0f} | - |")
    lines.append(f"| same, per rank with dp=8 | {node['per_rank_dp8']:,.0f} | "
                 f"{'yes' if one > node['per_rank_dp8'] else 'no'}: one worker {one / node['per_rank_dp8']:,.1f}x; "
                 f"needs {need['per_rank_dp8']} worker(s) per rank |")
    lines.append(f"| same, per rank with cp=8 (each cp peer builds its data rank's batch) | "
                 f"{node['per_rank_cp8']:,.0f} | {'yes' if one > node['per_rank_cp8'] else 'no'}: one worker "
                 f"{one / node['per_rank_cp8']:,.1f}x; needs {need['per_rank_cp8']} worker(s) per rank |")
    bal = r.get("balanced")
    if bal:
        lines += ["", f"Balanced steps (parallel.balance, launcher/balanced_batches.py), jsonl + sentencepiece: rank 0 "
                  f"of a cp4 group, 4 bins of {bal['budget']:,} tokens a step, a simulated device step of "
                  f"{bal['step_s'] * 1e3:.0f} ms (a sleep); the stall is the time next() takes (the trainer "
                  "waits for data).", "",
                  "| producer | first step s | stall ms/step (mean) | p90 | documents tokenized | steps |",
                  "|---|---|---|---|---|---|"]
        for label, m in bal["runs"].items():
            lines.append(f"| {label} | {m['startup_seconds']:.2f} | {m['stall_mean_s'] * 1e3:,.1f} | "
                         f"{m['stall_p90_s'] * 1e3:,.1f} | {m['docs_tokenized']} | {m['steps'] + 1} |")
        lines += ["", "First step: building the loader and the first step (the worker's start, and with a cold "
                  "index this rank tokenizing every document of the packer's lookahead to learn its length: "
                  "one rank alone here, no group to share them with). Documents tokenized: over all steps; "
                  "with the warm index only the documents whose tokens this rank holds."]
    group = r.get("balanced_group")
    if group:
        lines += ["", f"Balanced first pass (cold token-length index), jsonl + sentencepiece: 4 gloo ranks as tp2 x cp2 "
                  f"(balancing groups {sorted({tuple(g) for g in group['groups']})}), 4 bins of {group['budget']:,} "
                  f"tokens a step, inline, {group['steps']} steps with a simulated device step of "
                  f"{group['step_s'] * 1e3:.0f} ms (a sleep) before each but the first; times: the median of "
                  f"{group['repeats']} rounds (variants in turn). Lengths learned per balancing "
                  "group (as before) or by the world; the tokens of a rank's share of the lengths dropped (as "
                  "before) or kept for the documents it holds.", "",
                  "| lengths learned by, share's tokens | first step s (slowest rank) | time in next() s (mean rank) "
                  "| documents tokenized (4 ranks) | for lengths | reused | per rank |", "|---|---|---|---|---|---|---|"]
        for label, m in group["runs"].items():
            per_rank = " / ".join(str(x["docs_tokenized"]) for x in m["ranks"])
            lines.append(f"| {label} | {m['first_step_s_max']:.2f} | {m['data_s_mean']:.2f} | {m['docs_tokenized_sum']} | "
                         f"{m['lengths_tokenized_sum']} | {m['lengths_reused_sum']} | {per_rank} |")
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        for kind, ratio in group["ratio_before_after"].items():
            lines.append(f"| {kind}: before / after | {fmt(ratio['first_step_s_max'])} | {fmt(ratio['data_s_mean'])} | "
                         f"{fmt(ratio['docs_tokenized_sum'])} | {fmt(ratio['lengths_tokenized_sum'])} | | |")
        lines += ["", "Streamed: the same jsonl read through `datasets` in streaming mode (format hf_jsonl, a "
                  "sequential source): every rank reads the stream either way; before, each rank tokenized every "
                  "document it packed to learn its length.",
                  "", "4 ranks share this machine's cores, so the times hold every rank's tokenizing; the document "
                  "counts are exact."]
    lines += ["", f"1B model: {node['parameters'] / 1e9:.2f}B parameters, {node['flops_per_token'] / 1e9:,.1f} GFLOP "
              f"per token at {node['seq_len']:,} (6 x non-embedding params + head, + causal attention); "
              f"node tokens/s = 0.4 x 8 x 989e12 / FLOPs per token.", "",
              "Worker counts use this machine's single-core sentencepiece rate (the slow path; bytes and "
              "pre-tokenized megatron sources are faster). Workers are processes: they scale with free cores.", "",
              f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, Python {r['machine']['python']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

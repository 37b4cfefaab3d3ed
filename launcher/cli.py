"""The `longtrain` command.

    longtrain train  RECIPE [key=value ...] [--nproc N]   train (starting N local workers if asked)
    longtrain config RECIPE [key=value ...]               print the resolved, validated recipe
    longtrain tokenizer train --source S --vocab-size N --out F   train a sentencepiece model
    longtrain data inspect RECIPE [key=value ...]         document lengths, tokens, packing efficiency
    longtrain data export --out DIR                       the built-in corpus as jsonl shards
    longtrain probe [--out FILE]                          measure attention FLOP/s and P2P bandwidth -> preset
    longtrain plan balance RECIPE [key=value ...] [--mix NAME]   simulated step time per balance strategy

Bad input ends with one line on stderr naming the key, file or rank, and exit code 2 (1 for a
worker that failed while running).
"""
from __future__ import annotations

import argparse
import os
import sys

from longtrain.launcher.config import RecipeError, load_recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtrain", description="Train long-context models on a 4D mesh.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a recipe")
    train.add_argument("recipe", help="YAML recipe, e.g. configs/debug_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.steps=20")
    train.add_argument("--nproc", type=int, default=None, help="local worker processes (run.launch.nproc_per_node)")
    config = sub.add_parser("config", help="print the resolved recipe")
    config.add_argument("recipe")
    config.add_argument("overrides", nargs="*")
    config.add_argument("--nproc", type=int, default=None)

    tokenizer = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer")
    tok_sub = tokenizer.add_subparsers(dest="action", required=True)
    tok_train = tok_sub.add_parser("train", help="train a sentencepiece model from any source")
    tok_train.add_argument("--source", action="append", required=True,
                           help="builtin, a jsonl/json/parquet/txt file, glob or directory, or hf:<dataset> "
                                "(repeatable)")
    tok_train.add_argument("--vocab-size", type=int, required=True)
    tok_train.add_argument("--out", required=True, help="the .model file to write")
    tok_train.add_argument("--text-field", default="text")
    tok_train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tok_train.add_argument("--max-docs", type=int, default=0, help="documents to read at most (0: all)")
    tok_train.add_argument("--skip-bad-records", action="store_true")
    tok_train.add_argument("--force", action="store_true", help="overwrite an existing --out")

    data = sub.add_parser("data", help="inspect or export data")
    data_sub = data.add_subparsers(dest="action", required=True)
    inspect = data_sub.add_parser("inspect", help="document lengths, token count, packing efficiency, histogram")
    inspect.add_argument("recipe")
    inspect.add_argument("overrides", nargs="*")
    inspect.add_argument("--docs", type=int, default=2000, help="documents to measure")
    inspect.add_argument("--steps", type=int, default=20, help="loader steps to measure packing over")
    inspect.add_argument("--out", default=None, help="directory for doc_lengths.png and data_inspect.json "
                                                     "(default: the recipe's run.dir)")
    export = data_sub.add_parser("export", help="write the built-in corpus as jsonl shards")
    export.add_argument("--out", required=True, help="directory for the .jsonl files")
    export.add_argument("--split", choices=["train", "eval"], default="train")
    export.add_argument("--shards", type=int, default=4)
    probe = sub.add_parser("probe", help="measure attention FLOP/s by length and local P2P bandwidth; write a "
                                         "cluster preset (parallel/balance/probe.py)")
    probe.add_argument("--out", default=None, help="preset file (default configs/clusters/local.yaml)")
    probe.add_argument("--lengths", default="256,512,1024,2048,4096", help="comma-separated sequence lengths")
    probe.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    probe.add_argument("--gpus-per-node", type=int, default=0)
    plan = sub.add_parser("plan", help="plan without running")
    plan_sub = plan.add_subparsers(dest="action", required=True)
    balance = plan_sub.add_parser("balance", help="simulate one step per balance strategy (parallel/balance/simulator.py)")
    balance.add_argument("recipe")
    balance.add_argument("overrides", nargs="*")
    balance.add_argument("--mix", default=None, help="a named length mix (long-tailed, arxiv, github, prolong64k) "
                                                    "instead of the recipe's data")
    balance.add_argument("--out", default=None, help="timeline PNG (default <run.dir>/balance_plan.png)")
    balance.add_argument("--nproc", type=int, default=None, help="ranks per node (run.launch.nproc_per_node)")
    return parser


def _plan_balance(args, overrides) -> int:
    import numpy as np

    from longtrain.launcher.config import resolve_degrees
    from longtrain.models.sizes import resolve_model_config
    from longtrain.parallel.balance.cost import CostModel, ModelShape, resolve_cluster
    from longtrain.parallel.balance.simulator import MIXES, compare_strategies, sample_lengths, timeline_png

    if args.nproc is not None:
        overrides = overrides + [f"run.launch.nproc_per_node={args.nproc}"]
    recipe = load_recipe(args.recipe, overrides)
    p = recipe.parallel
    world = recipe.run.launch.nproc_per_node * recipe.run.launch.nnodes
    degrees = resolve_degrees(p, world)
    dp, cp = degrees["dp_replicate"] * degrees["dp_shard"], degrees["cp"]
    group = dp * cp
    cm = CostModel(ModelShape.of(resolve_model_config(recipe.model), degrees["tp"]),
                   resolve_cluster(recipe.cluster.preset, recipe.cluster.gpus_per_node, world=group))
    budget = recipe.data.token_budget or recipe.data.batch_size * recipe.data.seq_len
    bins_n = p.balance_bins or dp
    if args.mix is not None:
        if args.mix not in MIXES:
            raise ValueError(f"--mix: unknown mix {args.mix!r}; known: {', '.join(MIXES)}")
        rng = np.random.default_rng(recipe.train.seed)
        lengths, bins = [], []
        for b in range(bins_n):
            part = sample_lengths(rng, budget, MIXES[args.mix])
            lengths, bins = lengths + part, bins + [b % dp] * len(part)
        source = f"mix {args.mix}"
    else:
        if recipe.data.packing != "varlen":
            raise ValueError("data.packing: plan balance reads varlen bins from the recipe's data; set "
                             "data.packing=varlen or pass --mix")
        from longtrain.data.loader import PackedLoader
        from longtrain.data.pipeline import DataSettings

        settings = DataSettings.from_config(recipe.data, recipe.train.seed, "train")
        settings.num_workers, settings.lanes = 0, settings.lanes or bins_n
        loader = PackedLoader(settings, dp_rank=0, dp_degree=1)
        lengths, bins = [], []
        for b in range(bins_n):
            cu = next(loader)["cu_seqlens"].tolist()
            lengths += [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
            bins += [b % dp] * (len(cu) - 1)
        source = f"the recipe's data ({len(lengths)} sequences)"
    sims = compare_strategies(lengths, bins, group, cp, cm, capacity=-(-3 * bins_n * budget // (2 * group)))
    print(f"one step of {sum(lengths)} tokens ({source}) on {group} ranks ({dp} data x {cp} cp), cluster "
          f"{cm.cluster.name}, {cm.cluster.gpus_per_node} per node")
    best = min(s.step_seconds for s in sims.values())
    for name, sim in sims.items():
        print(f"  {name:10s} step {sim.step_seconds:10.4g} s  ({sim.step_seconds / best:5.2f}x the best)  busy "
              f"max {sim.busy.max():.3g} s mean {sim.busy.mean():.3g} s  idle mean {sim.idle.mean():.3g} s  "
              f"sent max {sim.bytes_sent.max() / 2 ** 20:.1f} MiB")
    out = args.out or f"{recipe.run.dir}/balance_plan.png"
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    timeline_png(sims, out)
    print(f"timeline: {out}")
    return 0


def _probe_command(args) -> int:
    from longtrain.parallel.balance.cost import LOCAL_PRESET
    from longtrain.parallel.balance.probe import probe

    lengths = tuple(int(x) for x in args.lengths.split(",") if x)
    spec = probe(args.out or LOCAL_PRESET, lengths, args.gpus_per_node, args.device)
    table = ", ".join(f"{length}: {tflops * 1e3:.1f}" for length, tflops in spec.attention_tflops)
    print(f"attention GFLOP/s by length: {table}; linear {spec.linear_tflops * 1e3:.1f} GFLOP/s; "
          f"P2P {spec.intra_gbs:.2f} GB/s, latency {spec.latency_us:.0f} us -> {args.out or LOCAL_PRESET}")
    return 0


def _tokenizer_train(args) -> int:
    import os

    from longtrain.data.inspect import iter_texts
    from longtrain.data.tokenizers import SentencePieceTokenizer, train_sentencepiece

    if os.path.exists(args.out) and not args.force:
        raise RecipeError(f"--out: {args.out} exists; pass --force to overwrite it")
    counts: dict = {}
    texts = iter_texts(args.source, text_field=args.text_field, max_docs=args.max_docs,
                       skip_bad_records=args.skip_bad_records, counts=counts)
    info = train_sentencepiece(texts, args.vocab_size, args.out, model_type=args.model_type)
    tok = SentencePieceTokenizer(info["path"])
    skipped = f", {counts['skipped_records']} bad records skipped" if counts.get("skipped_records") else ""
    print(f"wrote {info['path']}: {args.model_type}, vocab {tok.vocab_size} (BOS {tok.bos_id}, EOS {tok.eos_id}, "
          f"PAD {tok.pad_id}) from {counts.get('documents', 0)} documents{skipped}")
    print(f"use it with: data.tokenizer={info['path']} model.vocab_size={tok.vocab_size}")
    return 0


def _data_command(args, overrides) -> int:
    if args.action == "export":
        from longtrain.data.inspect import export_builtin

        paths = export_builtin(args.out, split=args.split, shards=args.shards)
        print(f"wrote {len(paths)} files to {args.out}: {', '.join(os.path.basename(p) for p in paths)}")
        return 0
    from longtrain.data.inspect import format_stats, inspect_recipe

    recipe = load_recipe(args.recipe, overrides)
    print(format_stats(inspect_recipe(recipe, docs=args.docs, steps=args.steps, out=args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after --nproc: collect the ones argparse left over.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = list(getattr(args, "overrides", None) or []) + extra
    if args.command == "plan":
        try:
            return _plan_balance(args, overrides)
        except (RecipeError, ValueError) as err:
            print(f"longtrain: error: {err}", file=sys.stderr)
            return 2
    if args.command == "probe":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return _probe_command(args)
    if args.command in ("tokenizer", "data"):
        if extra and not (args.command == "data" and args.action == "inspect"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            return _tokenizer_train(args) if args.command == "tokenizer" else _data_command(args, overrides)
        except (RecipeError, ValueError) as err:
            print(f"longtrain: error: {err}", file=sys.stderr)
            return 2
    if args.nproc is not None:
        overrides.append(f"run.launch.nproc_per_node={args.nproc}")
    from longtrain.launcher.checkpoint import CheckpointError
    from longtrain.launcher.launch import LaunchError, StoppedBySignal, launch, preflight

    try:
        recipe = load_recipe(args.recipe, overrides)
        if args.command == "config":
            world = preflight(recipe, args.recipe, launching=False)
            print(recipe.to_yaml(), end="")
            print(_resolved_summary(recipe, world))
            return 0
        launch(recipe, args.recipe)
        return 0
    except (RecipeError, CheckpointError) as err:
        print(f"longtrain: error: {err}", file=sys.stderr)
        return 2
    except LaunchError as err:
        print(f"longtrain: error: {err}", file=sys.stderr)
        return 1
    except StoppedBySignal as err:
        print(f"longtrain: {err}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("longtrain: interrupted", file=sys.stderr)
        return 130


def _resolved_summary(recipe, world: int) -> str:
    from longtrain.launcher.config import resolve_degrees
    from longtrain.models.sizes import resolve_model_config

    degrees = resolve_degrees(recipe.parallel, world)
    cfg = resolve_model_config(recipe.model)
    layout = " x ".join(f"{k}={v}" for k, v in degrees.items())
    return (f"# resolved: {world} ranks = {layout}\n"
            f"# model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), "
            f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:,.1f}M parameters")


if __name__ == "__main__":
    sys.exit(main())

"""The `longtrain` command.

    longtrain train  RECIPE [key=value ...] [--nproc N]   train (starting N local workers if asked)
    longtrain config RECIPE [key=value ...]               print the resolved, validated recipe
    longtrain config --keys [--markdown]                  every recipe key: type, default, meaning
    longtrain slurm  RECIPE [key=value ...] --nodes N [--gpus-per-node G] [--time T] [--partition P] [--submit]
                                                          write (and submit) an sbatch script for the recipe
    longtrain tokenizer train --source S --vocab-size N --out F   train a sentencepiece model
    longtrain data inspect RECIPE [key=value ...]         document lengths, tokens, packing efficiency
    longtrain data export --out DIR                       the built-in corpus as jsonl shards
    longtrain plan RECIPE [--cluster h100] [--nodes N]    per-rank memory, step time, MFU; layouts that fit
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
    config = sub.add_parser("config", help="print the resolved recipe, or every recipe key (--keys)")
    config.add_argument("recipe", nargs="?")
    config.add_argument("--keys", action="store_true",
                        help="list every recipe key with its type, default and meaning (no recipe needed)")
    config.add_argument("--markdown", action="store_true", help="--keys as the README's markdown table")
    config.add_argument("overrides", nargs="*")
    config.add_argument("--nproc", type=int, default=None)

    slurm = sub.add_parser("slurm", help="write (and submit) an sbatch script for a recipe")
    slurm.add_argument("recipe")
    slurm.add_argument("overrides", nargs="*", help="dotted overrides, passed on to every rank")
    slurm.add_argument("--nodes", type=int, required=True, help="nodes (must equal run.launch.nnodes)")
    slurm.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per node, one rank each (default: run.launch.nproc_per_node; 0 for a CPU job "
                            "of run.launch.nproc_per_node ranks per node)")
    slurm.add_argument("--per-node", choices=["tasks", "torchrun"], default="tasks",
                       help="srun starts one task per rank (default), or one torchrun per node")
    slurm.add_argument("--time", default=None, help="time limit, Slurm format (e.g. 2-00:00:00)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--job-name", default=None)
    slurm.add_argument("--signal-before", type=int, default=300,
                       help="seconds before the time limit at which SIGTERM makes the job checkpoint and exit")
    slurm.add_argument("--out", default=None, help="the script to write (default: <run.dir>/longtrain.sbatch)")
    slurm.add_argument("--submit", action="store_true", help="sbatch the script")

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
    _add_plan_parser(sub)
    from longtrain.launcher import convert, evaluate, generate

    generate.add_parser(sub)
    convert.add_parser(sub)
    evaluate.add_parser(sub)
    probe = sub.add_parser("probe", help="measure attention FLOP/s by length and local P2P bandwidth; write a "
                                         "cluster preset (parallel/balance/probe.py)")
    probe.add_argument("--out", default=None, help="preset file (default configs/clusters/local.yaml)")
    probe.add_argument("--lengths", default="256,512,1024,2048,4096", help="comma-separated sequence lengths")
    probe.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    probe.add_argument("--gpus-per-node", type=int, default=0)
    probe.add_argument("--heads", type=int, default=8, help="attention heads of the kernels measured (the model's)")
    probe.add_argument("--head-dim", type=int, default=64, help="head dimension of the kernels measured")
    probe.add_argument("--dim", type=int, default=512, help="model dimension of the matmul measured")
    probe.add_argument("--model", default=None, help="a transformer size (models/sizes.py, e.g. tiny, llama-1b): its "
                                                     "heads and head dim for the attention kernels, and the linear rate "
                                                     "measured on the model itself (non-attention ops, head and loss), "
                                                     "not on a matmul")
    probe.add_argument("--ranks", type=int, default=4, help="local ranks the links are measured among (the ranks "
                                                           "that will train: the all_to_all's cost depends on them)")
    probe.add_argument("--links", default=None, help="take the node shape, links, latency and all_to_all cost from "
                                                     "this preset (A, B, C, h100x8 or a preset file) and probe only "
                                                     "the kernels: a machine with one GPU cannot measure a link")
    return parser


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="per-rank memory, predicted step time and MFU; the layouts that fit "
                                       "(`plan balance RECIPE`: simulated step time per balance strategy)")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--cluster", default="h100", help="accelerator preset (launcher/plan.py CLUSTERS)")
    plan.add_argument("--nodes", type=int, default=None, help="nodes (default: run.launch.nnodes)")
    plan.add_argument("--top", type=int, default=8, help="ranked layouts to show")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    # `longtrain plan balance RECIPE`: the recipe is then the first of `overrides`.
    plan.add_argument("--mix", default=None, help="plan balance: a named length mix (long-tailed, arxiv, github, "
                                                 "prolong64k) instead of the recipe's data")
    plan.add_argument("--out", default=None, help="plan balance: timeline PNG (default <run.dir>/balance_plan.png)")
    plan.add_argument("--nproc", type=int, default=None, help="plan balance: ranks per node (run.launch.nproc_per_node)")


def _plan_command(args, overrides) -> int:
    import json

    from longtrain.launcher.plan import format_plan, plan

    result = plan(load_recipe(args.recipe, overrides), cluster=args.cluster, nodes=args.nodes, top=args.top)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


def _plan_balance(args, overrides) -> int:
    import numpy as np

    from longtrain.launcher.config import resolve_degrees
    from longtrain.models.sizes import resolve_model_config
    from longtrain.parallel.balance.cost import (CostModel, ModelShape, attention_table_note, probe_shape_note,
                                                 resolve_cluster)
    from longtrain.parallel.balance.simulator import MIXES, compare_strategies, sample_lengths, timeline_png

    if args.nproc is not None:
        overrides = overrides + [f"run.launch.nproc_per_node={args.nproc}"]
    recipe = load_recipe(args.recipe, overrides)
    p = recipe.parallel
    world = recipe.run.launch.nproc_per_node * recipe.run.launch.nnodes
    degrees = resolve_degrees(p, world)
    dp, cp = degrees["dp_replicate"] * degrees["dp_shard"], degrees["cp"]
    group = dp * cp
    model_cfg = resolve_model_config(recipe.model)
    cm = CostModel(ModelShape.of(model_cfg, degrees["tp"]),
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
    from longtrain.launcher.balanced_batches import attention_capacity
    from longtrain.parallel.balance.cost import routing_enabled
    from longtrain.parallel.balance.remap import REMAP_SETTINGS

    routing = routing_enabled(recipe.cluster.routing, recipe.cluster.preset, recipe.cluster.gpus_per_node, group)
    sims = compare_strategies(lengths, bins, group, cp, cm, capacity=attention_capacity(bins_n, budget, group),
                              remap=p.balance_remap, routing=routing)
    per_node = min(cm.cluster.gpus_per_node, group)  # a preset's node may be larger than the group
    nodes = group // per_node
    print(f"one step of {sum(lengths)} tokens ({source}) on {group} ranks ({dp} data x {cp} cp), cluster "
          f"{cm.cluster.name}: {nodes} node{'s' if nodes > 1 else ''} of {per_node} ranks")
    # the cost model clamps at the table's last length; a probe of other shapes prices this model off
    for note in (attention_table_note(cm.cluster, max(lengths)), probe_shape_note(cm.cluster, model_cfg, recipe.model.name)):
        if note:
            print(f"  note: {note}")
    best = min(s.step_seconds for s in sims.values())
    for name, sim in sims.items():
        print(f"  {name:10s} step {sim.step_seconds:10.4g} s  ({sim.step_seconds / best:5.2f}x the best)  busy "
              f"max {sim.busy.max():.3g} s mean {sim.busy.mean():.3g} s  idle mean {sim.idle.mean():.3g} s  "
              f"sent max {sim.bytes_sent.max() / 2 ** 20:.1f} MiB" + ("  remapped" if sim.remapped else ""))
    print(f"  (as training runs them: zeppelin remaps {REMAP_SETTINGS[p.balance_remap]} (parallel.balance_remap), routing "
          f"{'on' if routing else 'off'} (cluster.routing))")
    out = args.out or f"{recipe.run.dir}/balance_plan.png"
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    timeline_png(sims, out)
    print(f"timeline: {out}")
    return 0


def _probe_command(args) -> int:
    from longtrain.launcher.supervisor import run_local_ranks
    from longtrain.parallel.balance.cost import LOCAL_PRESET, ClusterError, resolve_cluster
    from longtrain.parallel.balance.probe import MESSAGE_BYTES, link_times, probe

    lengths = tuple(int(x) for x in args.lengths.split(",") if x)
    if args.ranks < 2:
        raise SystemExit("longtrain probe: --ranks must be at least 2")
    model = None
    if args.model is not None:
        from longtrain.models.sizes import SIZES

        if args.model not in SIZES:
            raise SystemExit(f"longtrain probe: --model {args.model!r} is not a transformer size; known: "
                             f"{', '.join(SIZES)}")
        model = SIZES[args.model]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("longtrain probe: --device cuda: no CUDA device on this machine")
        if args.links is None and torch.cuda.device_count() < args.ranks:
            raise SystemExit(f"longtrain probe: --device cuda measures links among --ranks {args.ranks} GPUs and this "
                             f"machine has {torch.cuda.device_count()}: pass --links PRESET (e.g. h100x8) to take "
                             f"the links from a preset and probe the kernels only")
    preset_links = None
    if args.links is not None:
        try:
            preset_links = resolve_cluster(args.links)
        except ClusterError as err:
            raise SystemExit(f"longtrain probe: --links: {err}") from None
        links = {"p2p": None, "collective_s": None}
    else:
        # on CPU also the ring's work outside the kernels, at the attention shapes probed
        shape = ((model.n_heads, model.n_kv_heads, model.head_dim) if model is not None
                 else (args.heads, args.heads, args.head_dim))
        links = run_local_ranks(args.ranks, link_times, MESSAGE_BYTES, 3, shape,
                                backend="nccl" if args.device == "cuda" else "gloo", timeout_s=300)
    spec = probe(links["p2p"], args.out or LOCAL_PRESET, lengths, args.gpus_per_node, args.device, args.heads,
                 args.head_dim, args.dim, collective_s=links["collective_s"], model=model, links=preset_links,
                 ring_extra=links.get("ring_extra"), model_name=args.model or "")
    table = ", ".join(f"{length}: {tflops * 1e3:.1f}" for length, tflops in spec.attention_tflops)
    where = (f"links of preset {args.links}" if args.links is not None else
             f"P2P {spec.intra_gbs:.2f} GB/s, latency {spec.latency_us:.0f} us; all_to_all over {args.ranks} ranks "
             f"{spec.collective_us:.0f} us; a ring step's work outside the kernels {spec.ring_step_us:.0f} us + "
             f"{spec.ring_token_us:.2f} us a token")
    print(f"attention GFLOP/s by length: {table}; linear {spec.linear_tflops * 1e3:.1f} GFLOP/s; "
          f"{where} -> {args.out or LOCAL_PRESET}")
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


def _slurm_command(args, overrides) -> int:
    from longtrain.launcher.slurm import SlurmJob, sbatch_script, submit, write_script

    recipe = load_recipe(args.recipe, overrides)
    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, per_node=args.per_node, time=args.time,
                   partition=args.partition, account=args.account, job_name=args.job_name,
                   signal_before=args.signal_before)
    path = write_script(sbatch_script(recipe, args.recipe, overrides, job), recipe, args.out)
    print(f"wrote {path}")
    if args.submit:
        print(f"submitted job {submit(path)}")
    else:
        print(f"submit it with: sbatch {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after --nproc: collect the ones argparse left over.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = list(getattr(args, "overrides", None) or []) + extra
    if args.command in ("plan", "slurm"):
        try:
            if args.command == "slurm":
                return _slurm_command(args, overrides)
            if args.recipe == "balance":  # longtrain plan balance RECIPE [overrides]
                if not overrides:
                    parser.error("plan balance: give a recipe")
                args.recipe, overrides = overrides[0], overrides[1:]
                return _plan_balance(args, overrides)
            return _plan_command(args, overrides)
        except (RecipeError, ValueError) as err:
            print(f"longtrain: error: {err}", file=sys.stderr)
            return 2
    if args.command == "probe":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return _probe_command(args)
    if args.command in ("generate", "convert", "eval"):
        from longtrain.launcher import convert, evaluate, generate

        args.overrides = overrides
        return {"generate": generate, "convert": convert, "eval": evaluate}[args.command].run(args)
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
    from longtrain.launcher.run_lock import RunDirLocked

    if args.command == "config" and args.keys:
        from longtrain.launcher.config_keys import keys_markdown, keys_text

        print(keys_markdown() if args.markdown else keys_text())
        return 0
    if args.command == "config" and args.recipe is None:
        print("longtrain: error: config: give a recipe, or --keys", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe, overrides)
        if args.command == "config":
            world = preflight(recipe, args.recipe, launching=False)
            print(recipe.to_yaml(), end="")
            print(_resolved_summary(recipe, world))
            return 0
        launch(recipe, args.recipe)
        return 0
    except (RecipeError, CheckpointError, RunDirLocked) as err:
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

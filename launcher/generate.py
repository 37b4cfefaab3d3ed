"""`longtrain generate RECIPE_OR_RUN_DIR --prompt TEXT ... [--nproc N]`: load a model (the newest
checkpoint of the run, else model.hf_checkpoint, else the recipe's seeded init, said which) and
continue the prompts, all in one left-padded batch, with cached decoding (models/decode.py): KV
cache for standard attention, conv window + SSM state for Mamba-2 layers; for MLA the latent cache
with exact prefill and absorbed decode, or TPLA over `--tpla-degree` latent slices (with the
Hadamard or PCA reparameterisation folded in first; PCA calibrates on batches from the recipe's
data loader). Greedy, or sampled with --temperature and --top-p.

With --nproc N the decode runs tensor-parallel over N local gloo processes (parallel/decode.py):
this process loads the model once and hands its weights to the N ranks; standard, ladder and
hybrid models are sharded by heads (a ladder model's all-reduces overlap the next sublayer unless
--no-ladder-overlap); an MLA model is head-split too (exact absorbed decode, the whole latent cache
on every rank) or, with --decode tpla, replicated with each rank holding its 1/N slice of the
latent cache (the TPLA degree is N)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from longtrain.launcher.config import RecipeError, load_recipe
from longtrain.launcher.supervisor import JobFailed


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="continue prompts with a trained model (cached decoding)")
    gen.add_argument("recipe", help="a run directory (holding recipe.yaml) or a YAML recipe")
    gen.add_argument("overrides", nargs="*")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt text (repeatable: a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                     "probabilities reach this total (with --temperature > 0)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--nproc", type=int, default=1, help="tensor-parallel decode over N local processes (gloo)")
    gen.add_argument("--no-ladder-overlap", action="store_true",
                     help="ladder models at --nproc > 1: wait for each all-reduce at once (to measure the overlap)")
    gen.add_argument("--decode", choices=["absorbed", "tpla"], default="absorbed",
                     help="MLA only: exact absorbed decode, or TPLA over --tpla-degree latent slices")
    gen.add_argument("--tpla-degree", type=int, default=None, help="TPLA latent slices (default: --nproc, or 2 "
                     "on one process); at --nproc N it must be N")
    gen.add_argument("--latent-norm", choices=["exact", "local"], default="exact")
    gen.add_argument("--rotation", choices=["none", "hadamard", "pca"], default="none")
    gen.add_argument("--calibration-batches", type=int, default=4, help="PCA: loader batches to calibrate on")


def load_model(recipe, log=print):
    """The recipe's model on CPU with the best weights available: the run's newest checkpoint,
    else model.hf_checkpoint, else the seeded init."""
    import torch.distributed.checkpoint as dcp

    from longtrain.launcher.checkpoint import find_resume_dir
    from longtrain.models import build_model
    from longtrain.models.sizes import resolve_model_config

    cfg = resolve_model_config(recipe.model)
    model = build_model(cfg)
    model.init_weights(seed=recipe.train.seed)
    root = Path(recipe.checkpoint.dir or Path(recipe.run.dir) / "checkpoints")
    ckpt = find_resume_dir(root, "auto") if root.is_dir() else None
    if ckpt is not None:
        import warnings

        from longtrain.launcher.checkpoint import CheckpointError, check_residual_architecture, read_meta

        try:  # a ladder checkpoint is no standard model (and the reverse): one line
            check_residual_architecture(read_meta(ckpt), cfg, ckpt)
        except CheckpointError as err:
            raise ValueError(str(err)) from None

        state = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt))
        model.load_state_dict(state["model"])
        log(f"longtrain: weights from checkpoint {ckpt}")
    elif recipe.model.hf_checkpoint:
        if recipe.model.attention == "mla":
            from longtrain.models.hf_deepseek import load_into_mla_model

            load_into_mla_model(model, recipe.model.hf_checkpoint)
        else:
            from longtrain.models.hf import load_into_model

            load_into_model(model, recipe.model.hf_checkpoint)
        log(f"longtrain: weights from {recipe.model.hf_checkpoint}")
    else:
        log(f"longtrain: no checkpoint under {root} and no model.hf_checkpoint: the seeded init (untrained)")
    return model.eval()


def calibration_batches(recipe, count: int):
    from longtrain.data.loader import build_loader

    loader = build_loader(recipe.data, dp_rank=0, dp_degree=1, seed=recipe.train.seed)
    it = iter(loader)
    return [next(it)["tokens"] for _ in range(count)]


def recipe_of_run(recipe_or_run_dir: str, overrides: list[str]):
    """The recipe of a run directory (its recipe.yaml) or a YAML recipe, with overrides."""
    path = Path(recipe_or_run_dir)
    recipe_path = path / "recipe.yaml" if path.is_dir() else path
    if not recipe_path.is_file():
        raise RecipeError(f"{recipe_path}: no such recipe (give a run directory or a YAML recipe)")
    return load_recipe(recipe_path, overrides)


def _decode_on_rank(cfg, state, prompts, lengths, opts: dict) -> dict:
    """One rank of `generate --nproc N` (inside launcher.supervisor.run_local_ranks): the model from the
    weights the parent loaded, sharded and decoded over the world (parallel/decode.py)."""
    import torch.distributed as dist

    from longtrain.models import build_model
    from longtrain.parallel.decode import tp_generate

    model = build_model(cfg)
    model.load_state_dict(state)
    result = tp_generate(model.eval(), prompts, opts["max_new_tokens"], dist.group.WORLD, prompt_lengths=lengths,
                         decode=opts["decode"], latent_norm=opts["latent_norm"], ladder_overlap=opts["ladder_overlap"],
                         temperature=opts["temperature"], top_p=opts["top_p"], seed=opts["seed"],
                         eos_id=opts["eos_id"])
    return result["tokens"]


def run(args) -> int:
    from longtrain.data.tokenizers import build_tokenizer
    from longtrain.models.decode import LatentCache, check_length, check_sampling, generate, left_pad
    from longtrain.parallel.decode import check_tp_decode, has_mla, mla_config

    try:
        recipe = recipe_of_run(args.recipe, args.overrides)
        if args.max_new_tokens < 0:
            raise RecipeError(f"--max-new-tokens: {args.max_new_tokens} must be at least 0")
        if args.nproc < 1:
            raise RecipeError(f"--nproc: {args.nproc} must be at least 1")
        check_sampling(args.temperature, args.top_p)
        model = load_model(recipe, log=lambda m: print(m, file=sys.stderr))
        is_mla = has_mla(model)
        if not is_mla and (args.decode != "absorbed" or args.rotation != "none"):
            raise RecipeError("--decode/--rotation: TPLA options need an MLA model (model.attention=mla)")
        degree = args.tpla_degree or (args.nproc if args.nproc > 1 else 2)
        if args.nproc > 1 and args.decode == "tpla" and degree != args.nproc:
            raise RecipeError(f"--tpla-degree: {degree} is not --nproc {args.nproc}; TPLA shards the latent over "
                              "the tensor-parallel ranks (one slice per rank)")
        if is_mla and args.decode == "tpla" and mla_config(model.cfg).kv_lora_rank % degree:
            raise RecipeError(f"model.kv_lora_rank: {mla_config(model.cfg).kv_lora_rank} does not divide by the "
                              f"TPLA degree {degree}")
        check_tp_decode(model.cfg, args.nproc, args.decode)
        tokenizer = build_tokenizer(recipe.data.tokenizer)
        encoded = [tokenizer.encode(p, True, False) for p in args.prompt]
        check_length(model, max(len(ids) for ids in encoded), args.max_new_tokens)
        make = None
        if is_mla and args.rotation != "none":
            from longtrain.models.tpla import reparameterize

            batches = calibration_batches(recipe, args.calibration_batches) if args.rotation == "pca" else None
            reparameterize(model, args.rotation, batches)
        if is_mla and args.decode == "tpla" and args.nproc == 1:
            def make():
                return LatentCache("tpla", degree, latent_norm=args.latent_norm)
        prompts, lengths = left_pad(encoded)
        eos_id = getattr(tokenizer, "eos_id", None)
        if args.nproc == 1:
            tokens, _ = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 generator=torch.Generator().manual_seed(args.seed), make_latent_cache=make,
                                 eos_id=eos_id, prompt_lengths=lengths)
        else:
            from longtrain.launcher.supervisor import run_local_ranks

            opts = {"max_new_tokens": args.max_new_tokens, "decode": args.decode, "latent_norm": args.latent_norm,
                    "ladder_overlap": not args.no_ladder_overlap, "temperature": args.temperature,
                    "top_p": args.top_p, "seed": args.seed, "eos_id": eos_id}
            # no time limit: a long generation is not a hang (a failing rank ends the group at once)
            tokens = run_local_ranks(args.nproc, _decode_on_rank, model.cfg, model.state_dict(), prompts, lengths,
                                     opts)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        print(f"longtrain: error: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"longtrain: error: generate --nproc {args.nproc}: {err}", file=sys.stderr)
        return 1
    for i, prompt in enumerate(args.prompt):
        print(prompt + tokenizer.decode(tokens[i, prompts.shape[1]:].tolist()))
    return 0

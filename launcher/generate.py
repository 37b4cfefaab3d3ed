"""`longtrain generate RECIPE_OR_RUN_DIR --prompt TEXT ...`: load a model (the newest checkpoint
of the run, else model.hf_checkpoint, else the recipe's seeded init, said which) on one process
and continue the prompts with cached decoding (models/decode.py): KV cache for standard
attention; for MLA the latent cache with exact prefill and absorbed decode, or TPLA simulated over
`--tpla-degree` latent slices in this process (with the Hadamard or PCA reparameterisation
folded in first; PCA calibrates on batches from the recipe's data loader)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from longtrain.launcher.config import RecipeError, load_recipe


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="continue prompts with a trained model (cached decoding)")
    gen.add_argument("recipe", help="a run directory (holding recipe.yaml) or a YAML recipe")
    gen.add_argument("overrides", nargs="*")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt text (repeatable: a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--decode", choices=["absorbed", "tpla"], default="absorbed",
                     help="MLA only: exact absorbed decode, or TPLA over --tpla-degree latent slices")
    gen.add_argument("--tpla-degree", type=int, default=2)
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


def run(args) -> int:
    from longtrain.data.tokenizers import build_tokenizer
    from longtrain.models.decode import LatentCache, generate
    from longtrain.models.mla import MLAttention

    try:
        recipe = recipe_of_run(args.recipe, args.overrides)
        if args.max_new_tokens < 0:
            raise RecipeError(f"--max-new-tokens: {args.max_new_tokens} must be at least 0")
        model = load_model(recipe, log=lambda m: print(m, file=sys.stderr))
        is_mla = any(isinstance(m, MLAttention) for m in model.modules())
        if not is_mla and (args.decode != "absorbed" or args.rotation != "none"):
            raise RecipeError("--decode/--rotation: TPLA options need an MLA model (model.attention=mla)")
        make = None
        if is_mla:
            if args.rotation != "none":
                from longtrain.models.tpla import reparameterize

                batches = calibration_batches(recipe, args.calibration_batches) if args.rotation == "pca" else None
                reparameterize(model, args.rotation, batches)
            if args.decode == "tpla":
                if model.cfg.kv_lora_rank % args.tpla_degree:
                    raise RecipeError(f"model.kv_lora_rank: {model.cfg.kv_lora_rank} does not divide by the TPLA "
                                      f"degree {args.tpla_degree}")

                def make():
                    return LatentCache("tpla", args.tpla_degree, latent_norm=args.latent_norm)
        tokenizer = build_tokenizer(recipe.data.tokenizer)
        gen = torch.Generator().manual_seed(args.seed)
        by_length: dict[int, list[int]] = {}
        encoded = [tokenizer.encode(p, True, False) for p in args.prompt]
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        outputs: dict[int, list[int]] = {}
        for length, idx in by_length.items():  # one batch per prompt length
            prompts = torch.tensor([encoded[i] for i in idx])
            tokens, _ = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, generator=gen,
                                 make_latent_cache=make, eos_id=getattr(tokenizer, "eos_id", None))
            for row, i in enumerate(idx):
                outputs[i] = tokens[row, length:].tolist()
    except (RecipeError, ValueError, FileNotFoundError) as err:
        print(f"longtrain: error: {err}", file=sys.stderr)
        return 2
    for i, prompt in enumerate(args.prompt):
        print(prompt + tokenizer.decode(outputs[i]))
    return 0

"""`longtrain convert RECIPE_OR_RUN_DIR --out DIR [--rotation hadamard|pca|none]`: TPLA's offline
reparameterisation of an MLA model (models/tpla.py: the latent norm's gain folded, then a Hadamard
or PCA rotation of the latent folded into the weights; PCA calibrated on batches from the recipe's
data loader), written as a Hugging Face DeepSeek-V3 directory. The result is exactly the same MLA
model (transformers loads it with the same logits); decoding it with TPLA uses the rotated latent:
`longtrain generate RECIPE model.hf_checkpoint=DIR --decode tpla`."""
from __future__ import annotations

import sys

from longtrain.launcher.config import RecipeError


def add_parser(sub) -> None:
    conv = sub.add_parser("convert", help="fold TPLA's latent reparameterisation into an MLA model, export it")
    conv.add_argument("recipe", help="a run directory (holding recipe.yaml) or a YAML recipe")
    conv.add_argument("overrides", nargs="*")
    conv.add_argument("--out", required=True, help="the Hugging Face DeepSeek-V3 directory to write")
    conv.add_argument("--rotation", choices=["none", "hadamard", "pca"], default="pca")
    conv.add_argument("--calibration-batches", type=int, default=8, help="PCA: loader batches to calibrate on")
    conv.add_argument("--force", action="store_true", help="overwrite a non-empty --out")


def run(args) -> int:
    from longtrain.launcher.generate import calibration_batches, load_model, recipe_of_run
    from longtrain.models.mla import MLATransformer
    from longtrain.models.tpla import reparameterize

    try:
        recipe = recipe_of_run(args.recipe, args.overrides)
        if recipe.model.attention != "mla":
            raise RecipeError("model.attention: convert reparameterises MLA models; this recipe's attention is "
                              f"{recipe.model.attention}")
        model = load_model(recipe, log=lambda m: print(m, file=sys.stderr))
        assert isinstance(model, MLATransformer)
        batches = calibration_batches(recipe, args.calibration_batches) if args.rotation == "pca" else None
        reparameterize(model, args.rotation, batches)
        from longtrain.models.hf_deepseek import save_hf_deepseek

        out = save_hf_deepseek(model.state_dict(), model.cfg, args.out, overwrite=args.force)
    except (RecipeError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"longtrain: error: {err}", file=sys.stderr)
        return 2
    print(f"longtrain: wrote {out} (latent norm gain folded, {args.rotation} rotation)")
    return 0

"""`longtrain convert`: offline conversions of a trained model.

`longtrain convert RECIPE_OR_RUN_DIR --out DIR [--rotation hadamard|pca|none]`: TPLA's offline
reparameterisation of an MLA model (models/tpla.py: the latent norm's gain folded, then a Hadamard
or PCA rotation of the latent folded into the weights; PCA calibrated on batches from the recipe's
data loader), written as a Hugging Face DeepSeek-V3 directory. The result is exactly the same MLA
model (transformers loads it with the same logits); decoding it with TPLA uses the rotated latent:
`longtrain generate RECIPE model.hf_checkpoint=DIR --decode tpla`.

`longtrain convert HF_LLAMA_DIR --ladder-layers K --out DIR [--dtype fp32|bf16]`: Ladder Residual
adaptation (models/ladder.py; arXiv 2501.06589 converts the upper 16 of Llama-3.1-8B's 32 layers).
The weights stay as they are; the last K layers are rewired (each sublayer reads the stream without
its predecessor's output; the first converted layer reads the stream after the attention of the
last standard layer), so the first n_layers - K layers compute what they did. Written as a
longtrain checkpoint (DIR/step_00000000, meta.json carrying model.residual=ladder and
model.ladder_layers=K) to start the adaptation fine-tune from:
`longtrain train configs/llama3_8b_ladder.yaml checkpoint.init_from=DIR`. Loading it into a standard
model (or a Hugging Face Llama into a ladder one) is refused in one line."""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from longtrain.launcher.config import RecipeError


def add_parser(sub) -> None:
    conv = sub.add_parser("convert", help="fold TPLA's latent reparameterisation into an MLA model, export it; "
                                          "or (--ladder-layers) turn a Hugging Face Llama into a ladder model")
    conv.add_argument("recipe", help="a run directory (holding recipe.yaml) or a YAML recipe; with --ladder-layers, "
                                     "a Hugging Face Llama directory")
    conv.add_argument("overrides", nargs="*")
    conv.add_argument("--out", required=True, help="the Hugging Face DeepSeek-V3 directory to write")
    conv.add_argument("--rotation", choices=["none", "hadamard", "pca"], default="pca")
    conv.add_argument("--calibration-batches", type=int, default=8, help="PCA: loader batches to calibrate on")
    conv.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    conv.add_argument("--ladder-layers", type=int, default=None, metavar="K",
                      help="Ladder Residual: make the last K layers of the Hugging Face Llama ladder layers and "
                           "write a longtrain checkpoint (for checkpoint.init_from)")
    conv.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                      help="--ladder-layers: the checkpoint's parameter dtype (fp32: the trainer's master weights)")


def run(args) -> int:
    if args.ladder_layers is not None:
        return _run_ladder(args)
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


# ----------------------------------------------------------------------------------------------
# Ladder Residual: a Hugging Face Llama with its last K layers converted
# ----------------------------------------------------------------------------------------------
def _run_ladder(args) -> int:
    from longtrain.launcher.checkpoint import CheckpointError

    try:
        if args.overrides:
            raise ValueError(f"--ladder-layers: convert reads the model from the Hugging Face directory; "
                             f"recipe overrides ({args.overrides[0]}) do not apply")
        out = convert_llama_to_ladder(args.recipe, args.ladder_layers, args.out, args.dtype, overwrite=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as err:
        print(f"longtrain: error: {err}", file=sys.stderr)
        return 2
    print(f"longtrain: wrote {out} (the last {args.ladder_layers} layers are ladder layers); fine-tune from it with "
          f"checkpoint.init_from={args.out} model.residual=ladder model.ladder_layers={args.ladder_layers}")
    return 0


def convert_llama_to_ladder(hf_dir: str | Path, ladder_layers: int, out: str | Path, dtype: str = "fp32",
                            overwrite: bool = False) -> Path:
    """Read a Hugging Face Llama directory, make its last `ladder_layers` layers ladder layers and
    write the result as a longtrain checkpoint under `out` (one process; no GPU). Returns the step
    directory written."""
    import torch
    import torch.distributed as dist

    from longtrain.launcher.checkpoint import CheckpointManager, model_fields
    from longtrain.models.hf import CONFIG_NAME, load_hf_checkpoint
    from longtrain.models.transformer import Transformer

    src, out = Path(hf_dir), Path(out)
    if not (src / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face checkpoint directory (no {CONFIG_NAME})")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out: {out} is not empty (pass --force to replace it)")
        shutil.rmtree(out)
    hf_cfg, state = load_hf_checkpoint(src)
    n = hf_cfg.n_layers
    if isinstance(ladder_layers, bool) or not 0 <= ladder_layers <= n:
        raise ValueError(f"--ladder-layers: {ladder_layers} must be between 0 and the checkpoint's {n} layers")
    cfg = dataclasses.replace(hf_cfg, residual="ladder", ladder_layers=ladder_layers)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)  # names and shapes checked; no copy
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    meta = {"layout": "converted (one process)", "degrees": {}, "model": model_fields("transformer", cfg),
            "train": {"step": 0, "data": None},
            "converted_from": {"hugging_face": str(src.resolve()), "ladder_layers": ladder_layers}}
    own_group = not dist.is_initialized()
    if own_group:  # the checkpoint writer is collective: a group of one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return CheckpointManager(out, keep=1).save(0, {"model": model.state_dict()}, meta)
    finally:
        if own_group:
            dist.destroy_process_group()

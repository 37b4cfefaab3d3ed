"""The `longtrain` command.

    longtrain train  RECIPE [key=value ...] [--nproc N]   train (starting N local workers if asked)
    longtrain config RECIPE [key=value ...]               print the resolved, validated recipe

Bad input ends with one line on stderr naming the key, file or rank, and exit code 2 (1 for a
worker that failed while running).
"""
from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after --nproc: collect the ones argparse left over.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = list(args.overrides) + extra
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

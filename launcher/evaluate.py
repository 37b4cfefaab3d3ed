"""`longtrain eval RECIPE_OR_RUN_DIR`: the accuracy gate before decoding an MLA model with TPLA.

For exact MLA and for TPLA at each `--tpla-degrees` g with each `--rotations` reparameterisation
(none / hadamard / pca, folded into a copy of the weights; PCA calibrated on train-split loader
batches), on one process:
- perplexity on held-out sequences (the recipe's eval split): the first `--prefill` tokens
  prefilled (exact MLA), every later token decoded one per call through the caches, teacher-forced;
  with the logits' max |delta| and top-1 agreement against exact MLA;
- synthetic long-context retrieval: a random 6-character key stated once in held-out filler at a
  relative depth (0.1 .. 0.9), the statement repeated at the end of `--retrieval-lengths` tokens,
  and the key's tokens scored teacher-forced: the share of key tokens the model's argmax gets right.
A standard-attention model gets the exact rows only. Prints a table; `--json` writes the rows.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import torch

from longtrain.launcher.config import RecipeError

NEEDLE = "The secret key is {key}."
DEPTHS = (0.1, 0.5, 0.9)


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity and retrieval of MLA vs TPLA decoding (accuracy gate)")
    ev.add_argument("recipe", help="a run directory (holding recipe.yaml) or a YAML recipe")
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--tpla-degrees", default="2,4")
    ev.add_argument("--rotations", default="none,hadamard,pca")
    ev.add_argument("--eval-seqs", type=int, default=4)
    ev.add_argument("--eval-len", type=int, default=1024)
    ev.add_argument("--prefill", type=int, default=64)
    ev.add_argument("--retrieval-lengths", default="1024", help="comma-separated context lengths (0: skip)")
    ev.add_argument("--calibration-batches", type=int, default=2)
    ev.add_argument("--json", default=None, help="write the rows here")


def held_out(recipe, count: int, length: int, split: str = "eval") -> torch.Tensor:
    """(count, length) tokens of the recipe's held-out split. Rows of whole documents (`whole`,
    `varlen` packing: padded or of varying length) are read as documents end to end instead
    (`concat`), so every row is `length` real tokens."""
    from longtrain.data.loader import build_loader

    packing = "concat" if recipe.data.packing in ("whole", "varlen") else recipe.data.packing
    data = dataclasses.replace(recipe.data, seq_len=length, batch_size=1, packing=packing)
    it = iter(build_loader(data, dp_rank=0, dp_degree=1, seed=recipe.train.seed, split=split))
    return torch.cat([next(it)["tokens"] for _ in range(count)])


def retrieval_prompts(recipe, tokenizer, length: int, seed: int = 0) -> list[tuple[torch.Tensor, int, int, int]]:
    """(tokens (1, T), key start, key length, question length) per depth: filler from the eval
    split, the needle at the depth, and the needle again at the end (whose key tokens are scored)."""
    rng = random.Random(seed)
    filler = held_out(recipe, 1, length)[0].tolist()
    out = []
    for depth in DEPTHS:
        key = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6))
        needle = tokenizer.encode(" " + NEEDLE.format(key=key) + " ", False, False)
        query = tokenizer.encode(" " + NEEDLE.format(key=""), False, False)[:-1]  # up to the key
        key_ids = tokenizer.encode(key, False, False)
        room = length - len(needle) - len(query) - len(key_ids)
        if room < 8:
            raise ValueError(f"--retrieval-lengths: {length} tokens leave no room for filler")
        at = int(room * depth)
        ids = filler[:at] + needle + filler[at:room] + query + key_ids
        out.append((torch.tensor([ids]), len(ids) - len(key_ids), len(key_ids), len(query)))
    return out


def evaluate(model, recipe, degrees: list[int], rotations: list[str], eval_seqs: int, eval_len: int, prefill: int,
             retrieval_lengths: list[int], calibration_batches: int = 2, log=print) -> list[dict]:
    from longtrain.data.tokenizers import build_tokenizer
    from longtrain.models.decode import LatentCache, cached_logits
    from longtrain.models.mla import MLAttention
    from longtrain.models.tpla import reparameterize

    if eval_len <= prefill:
        raise ValueError(f"--eval-len: {eval_len} must exceed --prefill {prefill}")
    seqs = held_out(recipe, eval_seqs, eval_len + 1)
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    probes = [(n, retrieval_prompts(recipe, tokenizer, n)) for n in retrieval_lengths if n > 0]
    is_mla = any(isinstance(m, MLAttention) for m in model.modules())
    pristine = {k: v.clone() for k, v in model.state_dict().items()}

    def nll(logits):
        lp = torch.log_softmax(logits[:, prefill:].double(), -1)
        return float(-lp.gather(-1, targets[:, prefill:, None]).mean())

    def retrieval(make) -> dict:
        scores = {}
        for n, prompts in probes:
            hits = total = 0
            for ids, start, count, question in prompts:
                # the filler is prefilled; the question and the key are decoded through the caches
                logits = cached_logits(model, ids, start - question, make_latent_cache=make)
                guess = logits[0, start - 1:start - 1 + count].argmax(-1)
                hits += int((guess == ids[0, start:start + count]).sum())
                total += count
            scores[str(n)] = hits / total
        return scores

    exact = cached_logits(model, inputs, prefill)
    rows = [{"variant": "mla" if is_mla else "exact", "g": 1, "rotation": "-", "nll": nll(exact),
             "ppl": math.exp(nll(exact)), "max_abs_logit_delta": 0.0, "top1_agree": 1.0,
             "retrieval": retrieval(None)}]
    log(_row_line(rows[-1]))
    if not is_mla:
        return rows
    calibration = held_out(recipe, calibration_batches, min(eval_len, recipe.data.seq_len), "train").split(1)
    for rotation in rotations:
        model.load_state_dict(pristine)
        reparameterize(model, rotation, calibration)
        for g in degrees:
            if model.cfg.kv_lora_rank % g:
                raise ValueError(f"--tpla-degrees: model.kv_lora_rank {model.cfg.kv_lora_rank} does not divide by {g}")

            def make(g=g):
                return LatentCache("tpla", g)

            logits = cached_logits(model, inputs, prefill, make_latent_cache=make)
            tail, ref = logits[:, prefill:], exact[:, prefill:]
            value = nll(logits)
            rows.append({"variant": f"tpla_g{g}", "g": g, "rotation": rotation, "nll": value, "ppl": math.exp(value),
                         "max_abs_logit_delta": float((tail - ref).abs().max()),
                         "mean_abs_logit_delta": float((tail - ref).abs().mean()),
                         "top1_agree": float((tail.argmax(-1) == ref.argmax(-1)).double().mean()),
                         "retrieval": retrieval(make)})
            log(_row_line(rows[-1]))
    model.load_state_dict(pristine)
    return rows


def _row_line(r: dict) -> str:
    ret = " ".join(f"{n}:{s:.2f}" for n, s in r["retrieval"].items())
    return (f"{r['variant']:10s} {r['rotation']:9s} ppl {r['ppl']:9.4f}  max|dlogit| {r['max_abs_logit_delta']:.3g}"
            f"  top1 {r['top1_agree']:.4f}  retrieval {ret or '-'}")


def run(args) -> int:
    from longtrain.launcher.generate import load_model, recipe_of_run

    try:
        recipe = recipe_of_run(args.recipe, args.overrides)
        torch.manual_seed(0)
        model = load_model(recipe, log=lambda m: print(m, file=sys.stderr))
        rows = evaluate(model, recipe, [int(x) for x in args.tpla_degrees.split(",")], args.rotations.split(","),
                        args.eval_seqs, args.eval_len, args.prefill,
                        [int(x) for x in args.retrieval_lengths.split(",")], args.calibration_batches)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        print(f"longtrain: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0

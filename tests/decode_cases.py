"""Decoding cases that run inside a gloo group (tests/test_decode_parallel.py), and the models
they decode (shared with tests/test_decode_models.py)."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from longtrain.models import build_model
from longtrain.models.hybrid import HybridConfig
from longtrain.models.sizes import MLA_SIZES, SIZES


def peaked(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights away from the init (larger, non-unit norms, SSM parameters spread) so that logits are
    peaked and every term matters: a wrong cache changes the argmax."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 3 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 - 1.5)
            elif name.endswith("norm.weight") or name.endswith(".D"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    return model.eval()


def hybrid_cfg(**over) -> HybridConfig:
    base = dict(vocab_size=97, dim=32, pattern="M*M-", n_heads=4, n_kv_heads=2, ffn_dim=64, d_state=16, d_conv=4,
                expand=2, mamba_headdim=8, ngroups=2, chunk_size=8, max_seq_len=256)
    base.update(over)
    return HybridConfig(**base)


MODELS = {
    "standard": lambda: SIZES["tiny"],
    "ladder": lambda: dataclasses.replace(SIZES["tiny"], residual="ladder"),
    "ladder_last2": lambda: dataclasses.replace(SIZES["tiny"], residual="ladder", ladder_layers=2),
    "hybrid": lambda: hybrid_cfg(),
    "hybrid_ladder": lambda: hybrid_cfg(residual="ladder"),
    "mla": lambda: dataclasses.replace(MLA_SIZES["mla-tiny"], max_seq_len=256),
    "hybrid_mla": lambda: hybrid_cfg(pattern="M*-M*", mla=dataclasses.replace(
        MLA_SIZES["mla-tiny"], vocab_size=97, dim=32, n_heads=4, max_seq_len=256)),
}


def make(kind: str, seed: int = 0):
    return peaked(build_model(MODELS[kind]()), seed)


def prompts(lengths, vocab, seed=1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: the whole prefix through the model's plain forward at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def greedy_text(model, text: str, n: int) -> str:
    """recompute_greedy on a text through the byte tokenizer: what `longtrain generate` prints for it."""
    from longtrain.data.tokenizers import ByteTokenizer

    tokenizer = ByteTokenizer()
    return text + tokenizer.decode(recompute_greedy(model, tokenizer.encode(text, True, False), n))


def tp_decode_cases(cases: list[dict]) -> list[dict]:
    """Per case {kind, lengths, new, decode, overlap}: the case's model (identical on every rank),
    left-padded prompts of the given lengths, decoded over the whole world as the tp group.
    Returns rank 0's tokens, cache bytes, communication counts, and for a ladder model the order of
    sublayer computes and reduction launches/waits during the decode steps."""
    from longtrain.models.decode import left_pad
    from longtrain.parallel.decode import tp_generate
    from longtrain.parallel.ladder import SublayerReductions

    out = []
    for case in cases:
        model = make(case["kind"], case.get("seed", 0))
        padded, lengths = left_pad(prompts(case["lengths"], model.cfg.vocab_size, seed=case.get("prompt_seed", 1)))
        log: list = []
        calls = {"n": 0}

        def trace(module, *args):  # once the model is sharded: log computes and reductions
            sync = getattr(module, "residual_sync", None)
            if isinstance(sync, SublayerReductions) and sync.log is None:
                sync.log = log
                for key, block in module.layers.items():
                    names = ["mixer"] if hasattr(block, "kind") else ["attention", "feed_forward"]
                    for name in names:
                        label = f"layers.{key}.{name}"
                        getattr(block, name).register_forward_pre_hook(
                            lambda mod, a, label=label: log.append(("compute", label)))
            calls["n"] += 1
            log.append(("call", calls["n"]))

        model.register_forward_pre_hook(trace)
        result = tp_generate(model, padded, case["new"], dist.group.WORLD, prompt_lengths=lengths,
                             decode=case.get("decode", "absorbed"), ladder_overlap=case.get("overlap", True),
                             temperature=case.get("temperature", 0.0), top_p=case.get("top_p", 1.0))
        sublayers = [(f"layers.{k}.{n}", b.ladder) for k, b in model.layers.items()
                     for n in (["mixer"] if hasattr(b, "kind") else ["attention", "feed_forward"])]
        result.update(log=log, sublayers=sublayers, padded_len=padded.shape[1],
                      sharded=any(hasattr(p, "placements") for p in model.parameters()))
        out.append(result)
        dist.barrier()
    return out

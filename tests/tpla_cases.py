"""TPLA cases run inside a gloo group (tests/test_tpla.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def tpla_sharded_vs_reference(cases: list[dict]) -> list[dict]:
    """Per case: the same model and tokens on every rank; TPLA over the world as the tp group
    against the one-process TPLA reference (all g slices in this process) and exact MLA decode.
    Returns max abs logit errors, per-rank cache bytes and all-reduce counts (rank 0)."""
    from longtrain.models.decode import LatentCache, cached_logits
    from longtrain.models.mla import MLATransformer
    from longtrain.models.sizes import MLA_SIZES
    from longtrain.models.tpla import reparameterize
    from longtrain.parallel.tpla import tpla_cache_factory

    world = dist.get_world_size()
    group = dist.group.WORLD
    out = []
    for case in cases:
        cfg = MLA_SIZES["mla-tiny"]
        model = MLATransformer(cfg).eval()
        model.init_weights(case.get("seed", 0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "kv_norm" in name:
                    p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
                elif "wkv" in name or "wq" in name:
                    p.mul_(8)  # attention far from uniform, so that TPLA's error shows
        x = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(1))
        if case.get("rotation", "none") != "none":
            reparameterize(model, case["rotation"], [x])
        norm = case.get("latent_norm", "exact")
        try:
            make, reduce = tpla_cache_factory(case.get("degree", world), group, norm)
        except ValueError as err:
            out.append({"error": str(err)})
            continue
        caches = []
        sharded = cached_logits(model, x, 9, make_latent_cache=lambda: caches.append(make()) or caches[-1])
        reference = cached_logits(model, x, 9, make_latent_cache=lambda: LatentCache("tpla", world, latent_norm=norm))
        mla_caches = []
        exact = cached_logits(model, x, 9, make_latent_cache=lambda: mla_caches.append(LatentCache()) or mla_caches[-1])
        out.append({"err_vs_reference": float((sharded - reference).abs().max()),
                    "tpla_vs_mla": float((reference - exact).abs().max()),
                    "cache_bytes": sum(c.nbytes() for c in caches), "mla_cache_bytes": sum(c.nbytes() for c in mla_caches),
                    "all_reduces": reduce.calls, "d_c": cfg.kv_lora_rank, "d_r": cfg.qk_rope_head_dim})
    return out

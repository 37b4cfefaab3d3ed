"""TPLA decoding sharded over tp ranks (parallel/tpla.py, gloo) equals the one-process TPLA
reference within 1e-5 (the sharding is exact; TPLA's own math is the only approximation), keeps
(d_c/g + d_r)/(d_c + d_r) of MLA's latent-cache bytes per rank, and issues one all-reduce per layer
and decode call."""
import pytest

from distributed import run_group
from tpla_cases import tpla_sharded_vs_reference

CASES = [{"rotation": "none"}, {"rotation": "hadamard"}, {"rotation": "pca", "latent_norm": "local"},
         {"degree": 4}]


@pytest.mark.parametrize("world_size", [2, 4])
def test_tpla_sharded_equals_one_process_reference(world_size):
    cases = CASES if world_size == 2 else CASES[:2]
    results = run_group(world_size, tpla_sharded_vs_reference, cases)
    for case, got in zip(cases, results):
        if case.get("degree", world_size) != world_size:
            assert got["error"].startswith("decode.tpla_degree: 4 is not the tensor-parallel degree 2")
            continue
        assert got["err_vs_reference"] <= 1e-5, (case, got)
        assert got["tpla_vs_mla"] > 1e-3, (case, got)  # an approximation, not MLA again
        d_c, d_r = got["d_c"], got["d_r"]
        assert got["cache_bytes"] * (d_c + d_r) == got["mla_cache_bytes"] * (d_c // world_size + d_r), got
        assert got["all_reduces"] == 4 * (40 - 9), got  # 4 layers x 31 decode calls (prefill: none)

"""The balance attention engine equals single-device attention per document: out, dq, dk, dv within
1e-5 (fp32) at 2 and 4 ranks, for one step mixing lengths 1, 7, 100, 3000 and
one sequence longer than a rank's capacity, under every strategy, with and without remapping; and
it ran what the plan says (local and ring calls, remap exchanges); with the routing layer on over two
simulated nodes of two ranks, inter-node hops go through proxies and stay exact; a rank with no
attention tokens in the step takes part in the backward (remapped or not); MLA's head dims (value
head dim below the query/key one), remapped."""
import pytest

from balance_cases import engine_errors
from distributed import run_group

LENGTHS = [1, 7, 100, 3000, 5, 700, 33, 64]


def _cases(world):
    cases = []
    for strategy in ("zeppelin", "tokens", "even_cp", "hybrid_dp"):
        for remap in (True, False):
            cp = world if strategy != "hybrid_dp" or world == 2 else 2
            # capacity below 3000 tokens: the longest sequence must ring under every strategy
            cases.append({"lengths": LENGTHS, "strategy": strategy, "remap": remap, "cp": cp,
                          "capacity": 2600 if world == 2 else 1500, "tau": 16,
                          "name": f"{strategy} remap={remap} cp{cp}"})
    if world == 4:  # two simulated nodes of two ranks; the routing layer on (inter-node hops via proxies)
        cases.append({"lengths": [3000, 700, 5, 64], "strategy": "even_cp", "capacity": 1500, "gpus_per_node": 2,
                      "routing": True, "remap": False, "name": "even_cp routed"})
        cases.append({"lengths": LENGTHS, "strategy": "zeppelin", "capacity": 1500, "tau": 16, "gpus_per_node": 2,
                      "routing": True, "name": "zeppelin routed"})
        # a rank with no attention tokens (a ring of (0, 1), a local sequence on 2, nothing on 3): its output
        # stays in the graph, so its backward (and, remapped, the exchange's backward collective) runs
        for remap in (True, False):
            cases.append({"lengths": [2000, 700], "strategy": "tokens", "capacity": 1500, "remap": remap,
                          "empty": True, "name": f"tokens, a rank with no attention tokens, remap={remap}"})
        # three nested rings ((0, 1), (2, 3), (0, 1, 2, 3)) run in the reverse of their schedule
        cases.append({"lengths": [32, 1192, 977, 46, 59], "strategy": "zeppelin", "capacity": 900, "tau": 16,
                      "reverse_order": True, "name": "zeppelin, slots in reversed order"})
    # MLA's shapes: as many key/value heads as query heads, a value head dim (5) below the query/key one (8);
    # remapped, q, k and v travel in one exchange
    cases.append({"lengths": LENGTHS, "strategy": "zeppelin", "capacity": 2600 if world == 2 else 1500, "tau": 16,
                  "heads": 2, "kv_heads": 2, "v_dim": 5, "remap": True, "name": "zeppelin, MLA head dims"})
    cases.append({"lengths": LENGTHS, "strategy": "zeppelin", "capacity": 1500, "tau": 16, "gpus_per_node": 2,
                  "heads": 4, "kv_heads": 1, "name": "zeppelin two nodes gqa 4:1"} if world == 4 else
                 {"lengths": [1, 2, 3], "strategy": "even_cp", "capacity": 8, "name": "even_cp shorter than the ring"})
    return cases


@pytest.mark.parametrize("world", [2, 4])
def test_engine_matches_single_device(world):
    cases = _cases(world)
    for case, res in zip(cases, run_group(world, engine_errors, cases)):
        for key in ("out", "dq", "dk", "dv"):
            assert res[key] <= 1e-5, f"world {world} {case['name']}: {key} {res}"
        assert res["tokens"] == sum(case["lengths"])
        assert res["ring"] > 0, f"{case['name']}: no ring ran {res}"
        if case["strategy"] in ("zeppelin", "tokens", "hybrid_dp") and not case.get("reverse_order"):
            assert res["local"] > 0, f"{case['name']}: nothing ran locally {res}"
        assert (res["remap"] > 0) == case.get("remap", True), res
        assert (res["routed"] > 0) == case.get("routing", False), res
        assert res["followed_order"], f"{case['name']}: a rank ran its slots out of the plan's order"
        assert (res["empty_ranks"] > 0) == case.get("empty", False), res
        if case.get("reverse_order"):
            assert len(res["rings"]) == 3, res  # routed hops ran (only) when asked


def test_an_empty_output_stays_in_the_graph_in_the_inputs_dtype():
    """engine.empty_in_graph: no tokens, but every input (tensors and parameters, any dtype) gets a
    (zero) gradient through it, and it has the first input's dtype (bf16 q with fp32 scan parameters:
    a remapped output's exchange must move the same dtype on every rank)."""
    import torch

    from longtrain.parallel.balance.engine import empty_in_graph

    q = torch.zeros(1, 0, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    a_log = torch.ones(4, requires_grad=True)
    out = empty_in_graph((1, 0, 4, 16), q, a_log, None)
    assert out.shape == (1, 0, 4, 16) and out.dtype == torch.bfloat16 and out.grad_fn is not None
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.equal(a_log.grad, torch.zeros(4))

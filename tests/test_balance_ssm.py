"""Mamba-2 layers under parallel.balance (parallel/balance/ssm.py): a sequence's ring group is its
scan group, chunks contiguous, the conv halo and the scan state passed along each sequence's own ring.
Against the mixer on one device over the packed row (fp64): out and input gradient within 1e-9,
parameter gradients within 1e-6 relative (A = -exp(A_log) is fp32 in the mixer), for a step mixing lengths 1, 3, 7, 100 and sequences longer than a rank holds (rings of 2 to 4
members, chunks shorter than the conv window among them), with remapping on and off, and on two
simulated nodes. Asserted applied: ring slots ran (and local ones)."""
from balance_cases import ssm_errors
from distributed import run_group


def test_balanced_ssm_matches_one_device():
    mixed = [1, 7, 100, 3, 260, 40, 17, 90]
    cases = [
        {"lengths": mixed, "strategy": "zeppelin", "capacity": 200, "tau": 30},
        {"lengths": mixed, "strategy": "zeppelin", "capacity": 200, "tau": 30, "remap": False},
        {"lengths": mixed, "strategy": "even_cp", "capacity": 200},  # every sequence over all 4 ranks
        {"lengths": mixed, "strategy": "zeppelin", "capacity": 200, "tau": 30, "gpus_per_node": 2},
        {"lengths": [5, 9, 6], "strategy": "even_cp", "capacity": 20, "d_conv": 4},  # chunks of 1-3 < d_conv-1
    ]
    results = run_group(4, ssm_errors, cases)
    for case, res in zip(cases, results):
        assert res["out"] < 1e-9 and res["dx"] < 1e-9 and res["dparams"] < 1e-6, (case, res)
        assert res["ring"] > 0, (case, res)
    assert max(results[0]["groups"]) > 1 and results[0]["local"] > 0
    assert results[2]["groups"] == [4]

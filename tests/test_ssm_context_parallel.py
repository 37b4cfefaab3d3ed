"""Mamba-2 context parallelism equals one device: both modes at cp 2 and 4, outputs, input and
every parameter gradient, with packed documents crossing rank boundaries and lengths that do not
divide by cp; bad settings fail with one line."""
import pytest

from cases import ssm_cp_errors
from distributed import run_group
from longtrain.parallel.context.ssm import check_ssm_cp

# Documents that cross shard boundaries, a length-1 document, one starting exactly at a shard
# start (at cp 2 with 24 tokens: position 12), and trailing padding.
DOCS = [[3, 1, 8, 9, 2], [12, 7, 1, 3]]


def _cases():
    cases = []
    for mode in ("state_passing", "all_to_all"):
        for length, docs in ((24, None), (23, None), (23, DOCS), (24, [[12, 12], [5, 19]])):
            cases.append({"mode": mode, "length": length, "doc_lengths": docs})
        cases.append({"mode": mode, "length": 29, "ngroups": 2, "doc_lengths": DOCS})
    return cases


@pytest.mark.parametrize("cp", [2, 4])
def test_ssm_modes_match_single_device(cp):
    cases = _cases()
    for case, errors in zip(cases, run_group(cp, ssm_cp_errors, cases)):
        name = f"cp{cp} {case['mode']} length {case['length']} docs={case['doc_lengths']}"
        assert errors["out"] <= 1e-5 and errors["dx"] <= 1e-5, f"{name}: {errors}"
        assert errors["params_rel"] <= 1e-5, f"{name}: {errors}"


def test_bad_ssm_settings():
    with pytest.raises(ValueError, match="parallel.ssm_cp_mode: unknown mode 'scan'"):
        check_ssm_cp("scan", 2, 8, 1)
    with pytest.raises(ValueError, match=r"all_to_all needs the Mamba heads per tensor-parallel rank \(6 / "
                                         r"parallel.tp=2 = 3\) to divide by parallel.cp=4; use state_passing"):
        check_ssm_cp("all_to_all", 4, 6, 2, tp=2)
    check_ssm_cp("state_passing", 16, 4, 1)  # no head-count limit

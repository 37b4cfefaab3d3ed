"""Mamba-2 context parallelism equals one device: both modes at cp 2 and 4, outputs, input and
every parameter gradient, with packed documents crossing rank boundaries and lengths that do not
divide by cp; all_to_all with ngroups 1, 2, 4 (8) at 4 and 8 heads (groups shared by ranks, one
group per rank, several groups per rank); all_to_all sends each rank only the B/C groups of its
heads (bytes counted per collective); bad settings fail with one line."""
import pytest

from cases import ssm_cp_errors
from distributed import run_group
from longtrain.parallel.context.ssm import check_ssm_cp

pytestmark = pytest.mark.slow  # the long matrix / end-to-end runs (`-m 'not slow'` skips them)

# Documents that cross shard boundaries, a length-1 document, one starting exactly at a shard
# start (at cp 2 with 24 tokens: position 12), and trailing padding.
DOCS = [[3, 1, 8, 9, 2], [12, 7, 1, 3]]


def _cases():
    cases = []
    for mode in ("state_passing", "all_to_all"):
        for length, docs in ((24, None), (23, None), (23, DOCS), (24, [[12, 12], [5, 19]])):
            cases.append({"mode": mode, "length": length, "doc_lengths": docs})
        cases.append({"mode": mode, "length": 29, "ngroups": 2, "doc_lengths": DOCS})
    # all_to_all by group count: 4 heads (headdim 8) and 8 heads (headdim 4); at cp 2 and 4 this
    # covers g < cp (ranks share a group, g == 1 included), g == cp and g > cp (several groups
    # per rank, several heads per group or one).
    for headdim, groups in ((8, (1, 2, 4)), (4, (1, 2, 4, 8))):
        for g in groups:
            cases.append({"mode": "all_to_all", "length": 23, "ngroups": g, "headdim": headdim, "doc_lengths": DOCS})
    return cases


# Collectives counted in the byte test, with the elements each sends from one rank (gloo, standard
# algorithms): all-to-all sends (N-1)/N of its input; all-gather (N-1)x its input; ring all-reduce
# 2(N-1)/N x its buffer; reduce-scatter (N-1)x its output.
def _count_cases():
    return [{"ngroups": g, "headdim": headdim} for headdim, groups in ((8, (1, 2, 4)), (4, (1, 2, 4, 8)))
            for g in groups]


def _comm_counts(cases: list[dict]) -> list[dict]:
    """For each case, on every rank: one all_to_all Mamba-2 mixer forward and backward on a packed
    shard, with torch.distributed's collectives wrapped (comm.py looks them up at call time);
    returns the calls per phase as (op, dtype, input elements, elements sent by this rank)."""
    import torch
    import torch.distributed as dist

    from longtrain.models.mamba import Mamba2Mixer, MambaConfig
    from longtrain.parallel.context.ssm import build_ssm_core
    from longtrain.parallel.mesh import Mesh, ParallelDims

    N = dist.get_world_size()
    mesh = Mesh(ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=N, tp=1), "cpu")
    state = {"phase": None, "calls": []}
    sent = {
        "all_to_all_single": lambda a, kw: (a[1], a[1].numel() * (N - 1) // N),
        "all_gather": lambda a, kw: (a[1], a[1].numel() * (N - 1)),
        "all_gather_into_tensor": lambda a, kw: (a[1], a[1].numel() * (N - 1)),
        "all_reduce": lambda a, kw: (a[0], 2 * a[0].numel() * (N - 1) // N),
        "reduce_scatter": lambda a, kw: (a[0], a[0].numel() * (N - 1)),
        "reduce_scatter_tensor": lambda a, kw: (a[0], a[0].numel() * (N - 1)),
        "broadcast": lambda a, kw: (a[0], a[0].numel() * (N - 1)),
        "batch_isend_irecv": lambda a, kw: (None, sum(op.tensor.numel() for op in a[0] if op.op is dist.isend)),
    }
    real = {name: getattr(dist, name) for name in sent if hasattr(dist, name)}

    def wrap(name):
        def counted(*args, **kwargs):
            if state["phase"] is not None:
                tensor, n = sent[name](args, kwargs)
                state["calls"].append((state["phase"], name, None if tensor is None else str(tensor.dtype),
                                       None if tensor is None else tensor.numel(), n))
            return real[name](*args, **kwargs)
        return counted

    results = []
    try:
        for name in real:
            setattr(dist, name, wrap(name))
        for case in cases:
            torch.manual_seed(0)
            cfg = MambaConfig(dim=16, d_state=8, d_conv=4, expand=2, headdim=case["headdim"],
                              ngroups=case["ngroups"], chunk_size=5)
            mixer = Mamba2Mixer(cfg).double()
            mixer.ssm_core = build_ssm_core("all_to_all", mesh, backend="torch")
            b, l = 2, 6  # l tokens per rank
            hidden = torch.randn(b, l, cfg.dim, dtype=torch.float64, requires_grad=True)
            doc_ids = torch.zeros(b, l, dtype=torch.long)
            doc_ids[:, l // 2:] = 1  # packed: a document starts inside every shard
            state["calls"], state["phase"] = [], "fwd"
            out = mixer(hidden, doc_ids=doc_ids)
            state["phase"] = "bwd"
            out.backward(torch.randn_like(out))
            state["phase"] = None
            results.append({"b": b, "l": l, "h": cfg.n_heads, "p": cfg.headdim, "n": cfg.d_state,
                            "g": cfg.ngroups, "N": N, "calls": list(state["calls"])})
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return results


def _worker(cases: list[dict], count_cases: list[dict]):
    """One process group per cp for both the equivalence cases and the byte counts."""
    return ssm_cp_errors(cases), _comm_counts(count_cases)


@pytest.fixture(scope="module", params=[2, 4])
def group_results(request):
    cp = request.param
    cases = _cases()
    errors, counts = run_group(cp, _worker, cases, _count_cases())
    return cp, cases, errors, counts


def test_ssm_modes_match_single_device(group_results):
    cp, cases, results, _ = group_results
    for case, errors in zip(cases, results):
        name = (f"cp{cp} {case['mode']} length {case['length']} ngroups {case.get('ngroups', 1)} "
                f"headdim {case.get('headdim', 8)} docs={case['doc_lengths']}")
        assert errors["out"] <= 1e-5 and errors["dx"] <= 1e-5, f"{name}: {errors}"
        assert errors["params_rel"] <= 1e-5, f"{name}: {errors}"


def test_all_to_all_sends_only_my_groups(group_results):
    """Per rank and Mamba layer, forward: all-to-alls of x (b·l·h·p), dt (b·l·h), B/C of the groups
    each rank needs (b·l·2n·max(g, N): g/N groups per rank, or each group replicated N/g times) and
    y back (b·l·h·p), each sending (N-1)/N of its input; one all-gather, the int64 document ids
    (b·l, (N-1)·b·l sent). Backward: the same four all-to-alls in reverse, nothing else. No
    floating-point all-gather, all-reduce or reduce-scatter (B and C are no longer all-gathered)."""
    cp, _, _, counts = group_results
    for r in counts:
        b, l, h, p, n, g, N = (r[k] for k in "b l h p n g N".split())
        name = f"cp{cp} h={h} g={g}"
        a2a = sorted([b * l * h * p, b * l * h, b * l * 2 * n * max(g, N), b * l * h * p])
        for phase in ("fwd", "bwd"):
            calls = [c for c in r["calls"] if c[0] == phase]
            got = sorted(c[3] for c in calls if c[1] == "all_to_all_single")
            assert got == a2a, f"{name} {phase}: all-to-all inputs {got}, expected {a2a}"
            assert all(c[2] == "torch.float64" for c in calls if c[1] == "all_to_all_single"), f"{name}: {calls}"
            others = [c for c in calls if c[1] != "all_to_all_single"]
            expected_others = [(phase, "all_gather", "torch.int64", b * l, (N - 1) * b * l)] if phase == "fwd" else []
            assert others == expected_others, f"{name} {phase}: {others}"
            a2a_sent = sum(c[4] for c in calls if c[1] == "all_to_all_single")
            assert a2a_sent * N == (N - 1) * b * l * (2 * h * p + h + 2 * n * max(g, N)), f"{name} {phase}"
        bc_sent = (N - 1) * b * l * 2 * n * max(g, N) // N  # B/C elements one rank sends per pass
        old_fwd = (N - 1) * b * l * 2 * g * n  # what the all-gather of every group sent
        assert bc_sent < old_fwd or g < N, name


def test_bad_ssm_settings():
    with pytest.raises(ValueError, match="parallel.ssm_cp_mode: unknown mode 'scan'"):
        check_ssm_cp("scan", 2, 8, 1)
    with pytest.raises(ValueError, match=r"all_to_all needs the Mamba heads per tensor-parallel rank \(6 / "
                                         r"parallel.tp=2 = 3\) to divide by parallel.cp=4; use state_passing"):
        check_ssm_cp("all_to_all", 4, 6, 2, tp=2)
    with pytest.raises(ValueError, match=r"all_to_all needs each rank's 6 heads to fall in whole groups "
                                         r"\(model.ngroups=3\)"):
        check_ssm_cp("all_to_all", 2, 12, 3)  # groups of 4 heads, ranks of 6
    check_ssm_cp("all_to_all", 4, 8, 1)  # g < cp: ranks share the group
    check_ssm_cp("all_to_all", 4, 8, 2)
    check_ssm_cp("all_to_all", 2, 8, 8)  # several groups per rank
    check_ssm_cp("state_passing", 16, 4, 1)  # no head-count limit

"""`longtrain generate --nproc N`: tensor-parallel decode over local gloo ranks prints what one
process prints (greedy), for a ladder transformer, a hybrid ladder stack and an MLA model under
exact absorbed decode (heads split) and under TPLA (one process simulating the slices), prompts of different lengths in one batch; bad
settings fail with one line each."""
import pytest

from decode_cases import greedy_text
from longtrain.launcher.cli import main
from longtrain.launcher.config import load_recipe
from longtrain.launcher.generate import load_model

RECIPE = "configs/debug_cpu.yaml"
PROMPTS = ["def f(x):", "import", "for i in range(10):"]


def _generate(capsys, over, *flags) -> str:
    argv = ["generate", RECIPE, *over, "--max-new-tokens", "6", *flags]
    for p in PROMPTS:
        argv += ["--prompt", p]
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.mark.parametrize("over,flags", [
    (["model.name=tiny", "model.residual=ladder"], []),
    (["model.kind=hybrid", "model.name=tiny", "model.residual=ladder"], []),
    (["model.name=mla-tiny", "model.attention=mla"], []),  # head split, exact absorbed decode
    (["model.name=mla-tiny", "model.attention=mla"], ["--decode", "tpla"]),  # latent split over the ranks
])
def test_generate_nproc2_prints_what_one_process_prints(capsys, tmp_path, over, flags):
    over = over + [f"run.dir={tmp_path}"]
    one = _generate(capsys, over, *flags)
    two = _generate(capsys, over, "--nproc", "2", *flags)
    assert two == one and all(p in one for p in PROMPTS)
    if not flags:  # exact decoding: each line is the full forward's greedy continuation
        model = load_model(load_recipe(RECIPE, over), log=lambda m: None)
        assert one == "".join(greedy_text(model, p, 6) + "\n" for p in PROMPTS)


@pytest.mark.parametrize("over,flags,message", [
    (["model.name=tiny"], ["--max-new-tokens", "1020"], "generate: a prompt of 10 tokens + 1020 new tokens exceed "
                                                         "model.max_seq_len=1024"),
    (["model.name=tiny"], ["--nproc", "3"], "model.n_heads: 4 heads do not divide by --nproc 3"),
    (["model.name=mla-tiny", "model.attention=mla"], ["--nproc", "2", "--decode", "tpla", "--tpla-degree", "4"],
     "--tpla-degree: 4 is not --nproc 2"),
    (["model.name=tiny"], ["--temperature", "1", "--top-p", "1.5"], "generate: top_p 1.5 must be in (0, 1]"),
])
def test_generate_bad_settings_fail_with_one_line(capsys, tmp_path, over, flags, message):
    assert main(["generate", RECIPE, *over, f"run.dir={tmp_path}", "--prompt", "def f(x):", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("longtrain: error: " + message), err

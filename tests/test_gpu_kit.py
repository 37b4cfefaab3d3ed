"""tools/gpu_kit as far as a CPU allows: trimming a fake flash-attn / mamba-ssm source tree (files,
static_switch.h, setup.py), argument errors, the build plan, and the GPU runner's dry-run listing."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "gpu_kit"))

import prepare  # noqa: E402
import run_gpu_checks  # noqa: E402

# The shape of flash-attn 2.x's static_switch.h and setup.py, abridged.
STATIC_SWITCH = r"""#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

#define FP16_SWITCH(COND, ...)               \
  [&] {                                      \
    if (COND) {                              \
      using elem_type = cutlass::half_t;     \
      return __VA_ARGS__();                  \
    } else {                                 \
      using elem_type = cutlass::bfloat16_t; \
      return __VA_ARGS__();                  \
    }                                        \
  }()

#define HEADDIM_SWITCH(HEADDIM, ...)   \
  [&] {                                    \
    if (HEADDIM <= 32) {                   \
      constexpr static int kHeadDim = 32;  \
      return __VA_ARGS__();                \
    } else if (HEADDIM <= 64) {            \
      constexpr static int kHeadDim = 64;  \
      return __VA_ARGS__();                \
    } else if (HEADDIM <= 256) {           \
      constexpr static int kHeadDim = 256; \
      return __VA_ARGS__();                \
    }                                      \
  }()
"""
DIMS = (32, 64, 96, 128, 160, 192, 256)


def _setup_py(kernels):
    sources = "".join(f'                "csrc/flash_attn/src/{k}",\n' for k in kernels)
    return ("cc_flag = []\n"
            "if True:\n"
            '    cc_flag.append("-gencode")\n'
            '    cc_flag.append("arch=compute_80,code=sm_80")\n'
            "    if bare_metal_version >= Version(\"11.8\"):\n"
            '        cc_flag.append("-gencode")\n'
            '        cc_flag.append("arch=compute_90,code=sm_90")\n'
            "    if bare_metal_version >= Version(\"12.8\"):\n"
            '        cc_flag.append("-gencode")\n'
            '        cc_flag.append("arch=compute_100,code=sm_100")\n'
            "    ext_modules.append(CUDAExtension(\n"
            "            sources=[\n"
            '                "csrc/flash_attn/flash_api.cpp",\n'
            f"{sources}"
            "            ],\n"
            '            extra_compile_args={"nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}))\n')


def fake_flash_attn(root: Path) -> Path:
    tree = root / "flash_attn-2.8.3"
    src = tree / "csrc" / "flash_attn" / "src"
    src.mkdir(parents=True)
    kernels = []
    for d in DIMS:
        for dt in ("fp16", "bf16"):
            for kind in ("fwd", "bwd", "fwd_split"):
                for causal in ("", "_causal"):
                    kernels.append(f"flash_{kind}_hdim{d}_{dt}{causal}_sm80.cu")
    for k in kernels:
        (src / k).write_text("// kernel\n")
    (src / "static_switch.h").write_text(STATIC_SWITCH)
    (tree / "setup.py").write_text(_setup_py(kernels))
    return tree


def test_trim_flash_attn_fake_tree(tmp_path):
    tree = fake_flash_attn(tmp_path)
    info = prepare.trim_tree(tree, ["90"], ["bf16"], 128)
    left = sorted(p.name for p in (tree / "csrc/flash_attn/src").glob("*.cu"))
    # bf16 x head dims 32/64/96/128 x fwd/bwd/split x causal/not = 4 x 3 x 2
    assert len(left) == 24 and all("bf16" in n for n in left)
    assert {int(re.search(r"hdim(\d+)", n).group(1)) for n in left} == {32, 64, 96, 128}
    assert info["kernels_removed"] == len(DIMS) * 2 * 6 - 24
    setup = (tree / "setup.py").read_text()
    assert "hdim256" not in setup and "fp16" not in setup and "hdim128_bf16_sm80.cu" in setup
    assert "sm_90" in setup and "sm_80" not in setup and "sm_100" not in setup
    compile(setup, "setup.py", "exec")  # the emptied `if` blocks still parse
    for feature in ("DROPOUT", "ALIBI", "SOFTCAP", "LOCAL"):
        assert f'"-DFLASHATTENTION_DISABLE_{feature}"' in setup
    header = (tree / "csrc/flash_attn/src/static_switch.h").read_text()
    for feature in ("DROPOUT", "ALIBI", "SOFTCAP", "LOCAL"):
        assert f"#define FLASHATTENTION_DISABLE_{feature}" in header
    fp16 = re.search(r"#define FP16_SWITCH.*?\}\(\)", header, re.S).group(0)
    assert "cutlass::half_t" not in fp16 and "bf16 only" in fp16 and "throw std::invalid_argument" in fp16
    hd = re.search(r"#define HEADDIM_SWITCH.*?\}\(\)", header, re.S).group(0)
    assert re.findall(r"kHeadDim = (\d+)", hd) == ["32", "64", "96", "128"] and "head dims up to 128" in hd
    assert all(line.rstrip().endswith("\\") for line in hd.splitlines()[:-1])  # still one macro
    assert "BOOL_SWITCH" in header
    assert json.loads((tree / "TRIMMED.json").read_text())["package"] == "flash-attn"
    with pytest.raises(prepare.KitError, match="already trimmed"):
        prepare.trim_tree(tree, ["90"], ["bf16"], 128)


def test_trim_refuses_what_it_does_not_know(tmp_path):
    tree = fake_flash_attn(tmp_path)
    (tree / "setup.py").write_text((tree / "setup.py").read_text().replace("compute_90,code=sm_90", "compute_89,code=sm_89"))
    with pytest.raises(prepare.KitError, match="no -gencode entry for sm_90"):
        prepare.trim_tree(tree, ["90"], ["bf16"], 128)
    assert len(list((tree / "csrc/flash_attn/src").glob("*.cu"))) == len(DIMS) * 2 * 6  # left untouched
    assert "cutlass::half_t" in (tree / "csrc/flash_attn/src/static_switch.h").read_text()
    other = tmp_path / "numpy-2.0"
    other.mkdir()
    with pytest.raises(prepare.KitError, match="not a flash-attn"):
        prepare.trim_tree(other, ["90"], ["bf16"], 128)
    with pytest.raises(prepare.KitError, match="no FP16_SWITCH"):
        prepare.patch_static_switch("#pragma once\n", ["bf16"], 128)


def test_trim_mamba_arch_only_and_build_plan(tmp_path):
    tree = tmp_path / "mamba_ssm-2.2.4"
    tree.mkdir()
    (tree / "setup.py").write_text(_setup_py([]))
    prepare.trim_tree(tree, ["90"], ["bf16"], 128)
    assert "sm_80" not in (tree / "setup.py").read_text()
    fake_flash_attn(tmp_path)
    prepare.trim_tree(tmp_path / "flash_attn-2.8.3", ["90"], ["bf16"], 128)
    plan = prepare.build_plan(tmp_path, jobs=16)
    assert [t.name for t, _, _ in plan] == ["mamba_ssm-2.2.4", "flash_attn-2.8.3"]
    for _, cmd, env in plan:
        assert {"--no-deps", "--no-build-isolation", "--no-index"} <= set(cmd) and env["MAX_JOBS"] == "16"
    assert plan[1][2]["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE" and plan[0][2]["MAMBA_FORCE_BUILD"] == "TRUE"
    cmds = prepare.download_commands(tmp_path, prepare.PACKAGES)
    assert all({"download", "--no-deps", "--no-binary", ":all:"} <= set(c) for c in cmds)
    assert any("flash-attn==2.8.3" in c for c in cmds)


def test_prepare_cli_errors(tmp_path, capsys):
    assert prepare.main(["trim", str(tmp_path), "--dtypes", "fp8"]) == 2
    assert "--dtypes: fp8" in capsys.readouterr().err
    assert prepare.main(["trim", str(tmp_path), "--max-head-dim", "100"]) == 2
    assert "--max-head-dim: 100" in capsys.readouterr().err
    assert prepare.main(["build", str(tmp_path), "--dry-run"]) == 2
    assert "no trimmed source tree" in capsys.readouterr().err


def test_gpu_runner_dry_run():
    proc = subprocess.run([sys.executable, str(REPO / "tools/gpu_kit/run_gpu_checks.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [s.name for s in run_gpu_checks.steps()]
    for name in names:
        assert name in proc.stdout
    assert {"attention_kernel", "train_16k", "train_32k", "kernel_tests"} <= set(names)
    total = sum(s.budget_s for s in run_gpu_checks.steps())
    assert total <= run_gpu_checks.TOTAL_BUDGET_S and f"total budget {total} s" in proc.stdout
    assert "benchmarks/attention_kernel.py --device cuda" in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "tools/gpu_kit/run_gpu_checks.py"), "--only", "nope", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown step(s) nope" in bad.stderr


def test_gpu_runner_training_summary(tmp_path):
    """What the runner records for a training step: the run's last logged metrics next to
    `longtrain plan`'s prediction for the same recipe (the H100 16K numbers as a stand-in run)."""
    step = next(s for s in run_gpu_checks.steps() if s.name == "train_16k")
    run = tmp_path / "gpu_runs" / "train_16k"
    run.mkdir(parents=True)
    rows = [{"step": 5, "loss": 4.0}, {"step": 20, "loss": 2.93, "tokens_per_second": 29005.0, "mfu": 0.266,
                                       "peak_memory_gb": 74.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_gpu_checks._training_summary(step, tmp_path)
    assert summary["measured"]["tokens_per_second"] == 29005.0 and summary["measured"]["step"] == 20
    # The stand-in run (gpu_training_h100.md, 74.6 GiB) predates the chunked loss: it held the full
    # logits (~26 GiB at 16K tokens of a 128K vocabulary), which the kit's runs (train.loss_chunk_tokens
    # at its default) no longer form; the plan against that run itself is benchmarks/plan_validation.py.
    assert 74.6 - 30 < summary["predicted"]["peak_memory_gib"] < 74.6 - 20
    assert 0 < summary["predicted"]["mfu"] < 1
    step32 = next(s for s in run_gpu_checks.steps() if s.name == "train_32k")
    assert "parallel.activation_checkpoint=full" in " ".join(step32.command(tmp_path))
    assert run_gpu_checks._training_summary(step32, tmp_path)["predicted"]["peak_memory_gib"] < 79.1 * 0.98


@pytest.mark.skipif(not os.environ.get("LONGTRAIN_GPU_KIT_SDISTS"),
                    reason="set LONGTRAIN_GPU_KIT_SDISTS to a folder holding the flash-attn 2.8.3, mamba-ssm and "
                           "causal-conv1d sdists (prepare.py download) to trim the real trees")
def test_trim_real_sdists(tmp_path):
    import shutil

    for archive in Path(os.environ["LONGTRAIN_GPU_KIT_SDISTS"]).glob("*.tar.gz"):
        shutil.copy(archive, tmp_path)
    assert prepare.main(["trim", str(tmp_path)]) == 0
    trees = {prepare.package_of(t): t for t in tmp_path.iterdir() if t.is_dir()}
    for pkg, tree in trees.items():
        setup = (tree / "setup.py").read_text()
        compile(setup, "setup.py", "exec")
        assert set(re.findall(r"arch=compute_(\d+)", setup)) == {"90"}, pkg
    fa = trees["flash-attn"]
    kernels = sorted(p.name for p in (fa / "csrc/flash_attn/src").glob("flash_*hdim*.cu"))
    assert len(kernels) == 24 and all("bf16" in k and int(re.search(r"hdim(\d+)", k).group(1)) <= 128 for k in kernels)
    setup = (fa / "setup.py").read_text()
    listed = re.findall(r'"csrc/flash_attn/src/([^"]+\.cu)"', setup)
    assert sorted(listed) == kernels  # every listed kernel exists, every kept one is listed
    assert "-DFLASHATTENTION_DISABLE_SOFTCAP" in setup

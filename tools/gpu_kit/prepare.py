"""Prepare flash-attn (and mamba-ssm, causal-conv1d) for a GPU machine without network.

PyPI has no flash-attn wheel, and its setup.py otherwise downloads a prebuilt wheel from GitHub or
compiles every kernel (two dtypes x eight head dims x forward/backward/split, several
architectures: an hour and more). This kit does it in three steps:

    # 1. on a machine with the package index: the source distributions
    python tools/gpu_kit/prepare.py download --out gpu_kit/
    # 2. anywhere: trim them to what longtrain needs (bf16, head dims <= 128, sm_90)
    python tools/gpu_kit/prepare.py trim gpu_kit/
    # 3. copy gpu_kit/ to the GPU machine and build there (torch with CUDA installed; ~2 min on 16 cores)
    python tools/gpu_kit/prepare.py build gpu_kit/ --jobs 16

Trimming flash-attn: deletes the kernel instantiations (csrc/flash_attn/src/flash_*_hdim*_*.cu) of
other dtypes and larger head dims and drops them from setup.py's source list; makes static_switch.h
raise for other dtypes and head dims instead of dispatching to kernels that are not built; defines
FLASHATTENTION_DISABLE_{DROPOUT,ALIBI,SOFTCAP,LOCAL} (those features compile to nothing); keeps
only the requested `-gencode` architectures. mamba-ssm and causal-conv1d: only the architectures.
Every trimmed tree gets TRIMMED.json saying what was done; trimming twice is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGES = {"flash-attn": "2.8.3", "mamba-ssm": "2.2.4", "causal-conv1d": "1.5.0.post8"}
DISABLED_FEATURES = ("DROPOUT", "ALIBI", "SOFTCAP", "LOCAL")
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
DTYPES = {"bf16": "cutlass::bfloat16_t", "fp16": "cutlass::half_t"}
KERNEL_FILE = re.compile(r"flash_(?:fwd|bwd|fwd_split)_hdim(\d+)_(fp16|bf16)(?:_causal)?_sm\d+\.cu$")


class KitError(RuntimeError):
    """One line for the user."""


# ----------------------------------------------------------------------------------------------
# download
# ----------------------------------------------------------------------------------------------
def download_commands(out: Path, packages: dict) -> list[list[str]]:
    return [[sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             f"{name}=={version}", "-d", str(out)] for name, version in packages.items()]


# Reading an sdist's metadata runs its setup.py; these make it skip the CUDA build (and torch's
# CUDA checks) on the download machine.
SKIP_BUILD = {"FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE", "MAMBA_SKIP_CUDA_BUILD": "TRUE",
              "CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE"}


def download(out: Path, packages: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for cmd in download_commands(out, packages):
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, **SKIP_BUILD})
    return unpack(out)


def unpack(root: Path) -> list[Path]:
    """Unpack every sdist (.tar.gz) in root next to it; returns the source trees."""
    trees = []
    for archive in sorted(root.glob("*.tar.gz")):
        name = archive.name[: -len(".tar.gz")]
        target = root / name
        if not target.exists():
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
        trees.append(target)
    return trees


def package_of(tree: Path) -> str:
    name = tree.name.lower().replace("_", "-")
    for pkg in PACKAGES:
        if name.startswith(pkg + "-"):
            return pkg
    raise KitError(f"{tree}: not a flash-attn, mamba-ssm or causal-conv1d source tree")


# ----------------------------------------------------------------------------------------------
# trim
# ----------------------------------------------------------------------------------------------
def keep_arch_flags(setup_text: str, archs: list[str]) -> str:
    """Drop every `cc_flag.append("-gencode")` + `cc_flag.append("arch=compute_XX,code=sm_XX")` pair
    whose XX is not in `archs`; raise if none of `archs` is left (a setup.py this kit does not know)."""
    pair = re.compile(r'[ \t]*cc_flag\.append\(\s*"-gencode"\s*\)\s*\n'
                      r'[ \t]*cc_flag\.append\(\s*"arch=compute_(\w+),code=sm_\w+"\s*\)[ \t]*\n')
    kept = []

    def repl(m):
        if m.group(1) in archs:
            kept.append(m.group(1))
            return m.group(0)
        return ""

    text = pair.sub(repl, setup_text)
    if not kept:
        raise KitError(f"setup.py: no -gencode entry for sm_{'/'.join(archs)} found; cannot trim the architectures")
    # an `if ...:` left with an empty body (its next non-blank line not indented deeper): a `pass`
    text = re.sub(r"^([ \t]*)(if [^\n]+:[ \t]*\n)(?!(?:[ \t]*\n)*\1[ \t]+\S)", r"\1\2\1    pass\n", text,
                  flags=re.M)
    return text


def _headdim_switch(max_head_dim: int) -> str:
    dims = [d for d in (32, 64, 96, 128, 160, 192, 256) if d <= max_head_dim]
    lines = ["#define HEADDIM_SWITCH(HEADDIM, ...)   \\", "  [&] {                                    \\"]
    for i, d in enumerate(dims):
        lines += [f"    {'if' if i == 0 else '} else if'} (HEADDIM <= {d}) {{ \\",
                  f"      constexpr static int kHeadDim = {d}; \\", "      return __VA_ARGS__(); \\"]
    lines += ["    } else { \\",
              f'      throw std::invalid_argument("flash-attn trimmed by longtrain tools/gpu_kit: head dims up to '
              f'{max_head_dim} only"); \\', "    } \\", "  }()"]
    return "\n".join(lines)


def _fp16_switch(dtypes: list[str]) -> str:
    if dtypes == ["bf16"]:
        return "\n".join([
            "#define FP16_SWITCH(COND, ...) \\", "  [&] { \\", "    if (COND) { \\",
            '      throw std::invalid_argument("flash-attn trimmed by longtrain tools/gpu_kit: bf16 only"); \\',
            "    } \\", "    using elem_type = cutlass::bfloat16_t; \\", "    return __VA_ARGS__(); \\", "  }()"])
    if dtypes == ["fp16"]:
        return "\n".join([
            "#define FP16_SWITCH(COND, ...) \\", "  [&] { \\", "    if (!(COND)) { \\",
            '      throw std::invalid_argument("flash-attn trimmed by longtrain tools/gpu_kit: fp16 only"); \\',
            "    } \\", "    using elem_type = cutlass::half_t; \\", "    return __VA_ARGS__(); \\", "  }()"])
    return ""  # both: unchanged


def _replace_macro(text: str, name: str, body: str) -> str:
    """Replace `#define NAME(...) ... }()` (a backslash-continued macro) with body."""
    m = re.search(rf"#define {name}\(.*?\}}\(\)", text, flags=re.S)
    if m is None:
        raise KitError(f"static_switch.h: no {name} macro found; cannot trim this flash-attn version")
    return text[: m.start()] + body + text[m.end():]


def patch_static_switch(text: str, dtypes: list[str], max_head_dim: int) -> str:
    defines = "".join(f"#ifndef FLASHATTENTION_DISABLE_{f}\n#define FLASHATTENTION_DISABLE_{f}\n#endif\n"
                      for f in DISABLED_FEATURES)
    if "#pragma once" not in text:
        raise KitError("static_switch.h: no '#pragma once' line; cannot trim this flash-attn version")
    text = text.replace("#pragma once", "#pragma once\n// trimmed by longtrain tools/gpu_kit/prepare.py\n"
                                         "#include <stdexcept>\n" + defines, 1)
    fp16 = _fp16_switch(dtypes)
    if fp16:
        text = _replace_macro(text, "FP16_SWITCH", fp16)
    return _replace_macro(text, "HEADDIM_SWITCH", _headdim_switch(max_head_dim))


def trim_flash_attn(tree: Path, archs: list[str], dtypes: list[str], max_head_dim: int) -> dict:
    src = tree / "csrc" / "flash_attn" / "src"
    if not src.is_dir():
        raise KitError(f"{tree}: no csrc/flash_attn/src; not a flash-attn source tree")
    removed, kept = [], []
    for f in sorted(src.glob("flash_*_hdim*_*.cu")):
        m = KERNEL_FILE.search(f.name)
        if m is None:
            continue
        (removed if int(m.group(1)) > max_head_dim or m.group(2) not in dtypes else kept).append(f)
    if not kept:
        raise KitError(f"{src}: no kernel file left for dtypes {dtypes} and head dims <= {max_head_dim}")
    # everything is patched in memory first: a tree this kit cannot trim is left untouched
    switch = src / "static_switch.h"
    header = patch_static_switch(switch.read_text(), dtypes, max_head_dim)
    setup = tree / "setup.py"
    gone = {f.name for f in removed}
    lines = [ln for ln in setup.read_text().splitlines(keepends=True)
             if not any(f'/{name}"' in ln or f"/{name}'" in ln for name in gone)]
    text = keep_arch_flags("".join(lines), archs)
    flags = "".join(f'"-DFLASHATTENTION_DISABLE_{f}", ' for f in DISABLED_FEATURES)
    text = text.replace('"--use_fast_math",', '"--use_fast_math", ' + flags, 1)
    for f in removed:
        f.unlink()
    switch.write_text(header)
    setup.write_text(text)
    kept = [f.name for f in kept]
    return {"kernels_kept": kept, "kernels_removed": len(removed), "disabled": list(DISABLED_FEATURES)}


def trim_tree(tree: Path, archs: list[str], dtypes: list[str], max_head_dim: int) -> dict:
    marker = tree / "TRIMMED.json"
    if marker.exists():
        raise KitError(f"{tree}: already trimmed ({marker}); unpack the sdist again to trim differently")
    pkg = package_of(tree)
    if pkg == "flash-attn":
        info = trim_flash_attn(tree, archs, dtypes, max_head_dim)
    else:
        setup = tree / "setup.py"
        setup.write_text(keep_arch_flags(setup.read_text(), archs))
        info = {}
    info.update(package=pkg, archs=archs, dtypes=dtypes, max_head_dim=max_head_dim)
    marker.write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------
FORCE_BUILD = {"flash-attn": "FLASH_ATTENTION_FORCE_BUILD", "mamba-ssm": "MAMBA_FORCE_BUILD",
               "causal-conv1d": "CAUSAL_CONV1D_FORCE_BUILD"}
BUILD_ORDER = ("causal-conv1d", "mamba-ssm", "flash-attn")  # mamba-ssm imports causal_conv1d at runtime


def build_plan(root: Path, jobs: int) -> list[tuple[Path, list[str], dict]]:
    """(tree, command, env additions) per trimmed tree, in dependency order. The build uses the
    installed torch (no isolation: torch.utils.cpp_extension from it) and never the network."""
    trees = [t for t in sorted(root.iterdir()) if (t / "TRIMMED.json").exists()]
    if not trees:
        raise KitError(f"{root}: no trimmed source tree (run `prepare.py trim {root}` first)")
    by_pkg = {json.loads((t / "TRIMMED.json").read_text())["package"]: t for t in trees}
    out = []
    for pkg in BUILD_ORDER:
        if pkg in by_pkg:
            env = {FORCE_BUILD[pkg]: "TRUE", "MAX_JOBS": str(jobs), "NVCC_THREADS": "2"}
            if pkg == "flash-attn":  # flash-attn >= 2.7 also filters its -gencode list by this variable
                env["FLASH_ATTN_CUDA_ARCHS"] = ";".join(json.loads((by_pkg[pkg] / "TRIMMED.json").read_text())["archs"])
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-v",
                   str(by_pkg[pkg])]
            out.append((by_pkg[pkg], cmd, env))
    return out


def build(root: Path, jobs: int, dry_run: bool = False) -> None:
    steps = build_plan(root, jobs)
    for tree, cmd, env in steps:
        print("+", " ".join(f"{k}={v}" for k, v in env.items()), " ".join(cmd), flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True, env={**os.environ, **env})
    if not dry_run:
        check = "import flash_attn; print('flash_attn', flash_attn.__version__)"
        subprocess.run([sys.executable, "-c", check], check=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/gpu_kit/prepare.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    d = sub.add_parser("download", help="pip download the source distributions and unpack them")
    d.add_argument("--out", required=True, type=Path)
    for pkg, version in PACKAGES.items():
        d.add_argument(f"--{pkg}", default=version, metavar="VERSION", help=f"(default {version}; 'none' to skip)")
    t = sub.add_parser("trim", help="trim the unpacked source trees under a folder")
    t.add_argument("root", type=Path)
    t.add_argument("--arch", default="90", help="comma-separated compute capabilities kept (default 90)")
    t.add_argument("--dtypes", default="bf16", help="flash-attn dtypes kept: bf16, fp16 or bf16,fp16")
    t.add_argument("--max-head-dim", type=int, default=128)
    b = sub.add_parser("build", help="build and install the trimmed trees (on the GPU machine)")
    b.add_argument("root", type=Path)
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    b.add_argument("--dry-run", action="store_true", help="print the commands only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "download":
            pkgs = {k: getattr(args, k.replace("-", "_")) for k in PACKAGES}
            trees = download(args.out, {k: v for k, v in pkgs.items() if v != "none"})
            print("\n".join(str(t) for t in trees))
        elif args.action == "trim":
            archs = [a.strip() for a in args.arch.split(",") if a.strip()]
            dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
            bad = [d for d in dtypes if d not in DTYPES]
            if bad or not dtypes:
                raise KitError(f"--dtypes: {','.join(bad) or 'empty'} not one of {', '.join(DTYPES)}")
            if args.max_head_dim not in HEAD_DIMS[:-1] + (256,):
                raise KitError(f"--max-head-dim: {args.max_head_dim} is not one of {', '.join(map(str, HEAD_DIMS))}")
            if not args.root.is_dir():
                raise KitError(f"{args.root}: no such folder")
            unpack(args.root)
            for tree in [p for p in sorted(args.root.iterdir()) if p.is_dir()]:
                info = trim_tree(tree, archs, dtypes, args.max_head_dim)
                print(f"trimmed {tree}: {json.dumps({k: v for k, v in info.items() if k != 'kernels_kept'})}")
        else:
            build(args.root, args.jobs, args.dry_run)
    except KitError as err:
        print(f"prepare.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

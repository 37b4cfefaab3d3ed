"""Resuming runs no code from a checkpoint, and a broken checkpoint is one line naming the file.

Checkpoints travel between people and clusters: a pickle planted in the RNG file, in DCP's
`.metadata` or in a non-tensor entry must be refused before anything in it runs (each of these
ran `os.system` on resume before). Truncated or garbage shards and metadata, and a full disk during
a save, end in one CheckpointError line naming the file and the cause, with no partial save left."""
import pytest

from distributed import run_group
from reliability_cases import load_with_bytes_entry, save_hits_full_disk, tamper_cases

PLANTED = [("write_evil_torch_save", "rng/rank_00000.pt"),  # torch.load(weights_only=False) ran it
           ("write_evil_pickle", "rng/rank_00000.pt"),
           ("write_evil_pickle", ".metadata")]              # DCP's pickle.load ran it
DAMAGED = [("truncate", ".metadata", 40, "unreadable"),
           ("overwrite", ".metadata", b"\x00not a pickle" * 8, "unreadable"),
           ("truncate", "__0_0.distcp", 100, "unreadable shard"),
           ("overwrite", "__0_0.distcp", b"garbage" * 20, "unreadable shard"),
           ("overwrite", "rng/rank_00000.pt", b"garbage", "unreadable RNG state")]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tamper")
    cases = [(None, "", None)]
    cases += [(fn, target, str(root / f"pwned{i}")) for i, (fn, target) in enumerate(PLANTED)]
    cases += [(fn, target, arg) for fn, target, arg, _ in DAMAGED]
    return root, run_group(1, tamper_cases, str(root), cases)


def test_a_clean_checkpoint_resumes(resumed):
    _, out = resumed
    assert out[0] == {"error": None, "step": 2}


@pytest.mark.parametrize("i", range(len(PLANTED)), ids=[f"{fn}-{t}" for fn, t in PLANTED])
def test_resume_never_runs_a_planted_pickle(resumed, i):
    root, out = resumed
    error, path = out[1 + i]["error"], root / f"case{1 + i}" / "step_00000002" / PLANTED[i][1]
    assert not (root / f"pwned{i}").exists(), "code from the checkpoint ran"
    assert error is not None and error.startswith("CheckpointError: checkpoint: "), out[1 + i]
    assert str(path) in error and "\n" not in error, error


@pytest.mark.parametrize("i", range(len(DAMAGED)), ids=[f"{d[0]}-{d[1]}" for d in DAMAGED])
def test_corrupted_files_fail_in_one_line_naming_the_file(resumed, i):
    root, out = resumed
    k = 1 + len(PLANTED) + i
    error, path = out[k]["error"], root / f"case{k}" / "step_00000002" / DAMAGED[i][1]
    assert error is not None and error.startswith("CheckpointError: checkpoint: "), out[k]
    assert str(path) in error and DAMAGED[i][3] in error and "\n" not in error, error


def test_non_tensor_entries_are_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    out = run_group(1, load_with_bytes_entry, str(tmp_path / "ckpt"), str(marker))
    assert not marker.exists(), "code from the checkpoint ran"
    assert out["error"] is not None and "hyper" in out["error"] and "\n" not in out["error"], out


@pytest.mark.parametrize("how", ["enospc", "short_write"])
def test_full_disk_is_reported_with_the_size_needed_and_cleaned_up(tmp_path, how):
    ckpt = tmp_path / "ckpt"
    out = run_group(1, save_hits_full_disk, str(ckpt), how)
    error = out["error"]
    assert error is not None and error.startswith("CheckpointError: checkpoint: no space left on device"), out
    assert "needs about" in error and "KiB" in error and "4.0 KiB free" in error and "\n" not in error, error
    assert not [name for name in out["left"] if name.startswith(".tmp_")], out["left"]


def test_a_real_full_disk(tmp_path):
    """A 256 KiB tmpfs (root only, skipped elsewhere) cannot hold the tiny model's ~630 KiB checkpoint."""
    import subprocess

    from reliability_cases import save_on_small_disk

    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = run_group(1, save_on_small_disk, str(disk / "ckpt"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    error = out["error"]
    assert error is not None and error.startswith("CheckpointError: checkpoint: no space left on device"), out
    import re

    assert re.search(r"the checkpoint needs about [\d.]+ KiB, [\d.]+ KiB free", error) and "\n" not in error, error
    assert not [name for name in out["left"] if name.startswith((".tmp_", "step_"))], out["left"]

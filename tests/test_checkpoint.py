"""Checkpoint safety: a failed save never damages the previous good checkpoint; resume finds the
right checkpoint or fails with one line naming the directory."""
import pytest

from cases import failed_save_keeps_previous
from distributed import run_group
from longtrain.launcher.checkpoint import CheckpointError, CheckpointManager, find_resume_dir


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    out = run_group(1, failed_save_keeps_previous, str(tmp_path / "ckpt"))
    assert "OSError: disk full (simulated)" in out["error"] and "\n" not in out["error"], out["error"]
    assert out["resume_dir"].endswith("step_00000002")
    assert out["resumed_step"] == 2
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000002"
    assert not (tmp_path / "ckpt" / "step_00000004").exists()
    assert not (tmp_path / "ckpt" / ".tmp_step_00000004").exists()  # the partial save is removed


def _fake_checkpoint(root, name, complete=True):
    path = root / name
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"x")
    if complete:
        (path / "meta.json").write_text('{"step": 1, "format_version": 1}')
    return path


def test_resume_rules(tmp_path):
    assert find_resume_dir(tmp_path / "nothing-yet", "auto") is None
    assert find_resume_dir(tmp_path, "never") is None
    with pytest.raises(CheckpointError, match=r"checkpoint.resume: .*does-not-exist does not exist"):
        find_resume_dir(tmp_path, str(tmp_path / "does-not-exist"))
    incomplete = _fake_checkpoint(tmp_path / "a", ".tmp_step_00000005", complete=False)
    with pytest.raises(CheckpointError, match="save never completed"):
        find_resume_dir(tmp_path, str(incomplete))
    with pytest.raises(CheckpointError, match="no completed checkpoint \\(no 'latest' file\\)"):
        find_resume_dir(tmp_path, str(tmp_path / "a"))
    done = _fake_checkpoint(tmp_path / "b", "step_00000003")
    with pytest.raises(CheckpointError, match="holds checkpoints .* but no 'latest' file"):
        find_resume_dir(tmp_path / "b", "auto")
    assert find_resume_dir(tmp_path, str(done)) == done
    (tmp_path / "b" / "latest").write_text("step_00000003\n")
    assert find_resume_dir(tmp_path / "b", "auto") == done
    (tmp_path / "b" / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="not a completed checkpoint"):
        find_resume_dir(tmp_path / "b", "auto")


def test_checkpoint_before_fused_qkv_is_refused_with_the_reason(tmp_path):
    """Format 2 checkpoints hold attention.wq/wk/wv; loading one names the change in one line."""
    old = _fake_checkpoint(tmp_path, "step_00000001")
    (old / "meta.json").write_text('{"step": 1, "format_version": 2}')
    with pytest.raises(CheckpointError) as err:
        CheckpointManager.load(old, {})
    message = str(err.value)
    assert "\n" not in message and str(old) in message and "format version 2 is not 3" in message
    assert "attention.wqkv" in message and "attention.wq/wk/wv" in message

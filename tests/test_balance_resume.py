"""Resume under parallel.balance: mid-run under zeppelin at cp4 continues with identical batches
(same losses as the uninterrupted run); resumed on 2 ranks (another group size) with balance_bins
fixed, the global stream continues where it stopped (the cursor, and the losses of the uninterrupted
run); and with the default bins (one per data rank) at another data degree, the cursor continues
from the saved row: nothing repeated or skipped."""
from balance_cases import train_balanced
from distributed import run_group

SIX = ["train.steps=6", "parallel.balance_bins=2"]


def _close(a, b, steps, rel=1e-4):
    for step in steps:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), f"step {step}: {a[step]} vs {b[step]}"


def test_resume_mid_run_and_at_another_group_size(tmp_path):
    cp4 = SIX + ["parallel.cp=4", "parallel.balance=zeppelin"]
    full, first, resumed = run_group(4, train_balanced, [
        cp4,
        {"overrides": cp4 + [f"checkpoint.dir={tmp_path}/a"], "stop_after": 3},
        cp4 + [f"checkpoint.dir={tmp_path}/a", "checkpoint.resume=auto"],
    ])
    assert first["cursor"] == 3 * 2 and sorted(first["losses"]) == [1, 2, 3]
    assert sorted(resumed["losses"]) == [4, 5, 6] and resumed["cursor"] == 6 * 2
    _close(first["losses"], full["losses"], [1, 2, 3], rel=1e-6)
    _close(resumed["losses"], full["losses"], [4, 5, 6], rel=1e-6)
    # the same checkpoint on 2 ranks (cp2): another balancing group, the same global batches
    two, dp2 = run_group(2, train_balanced, [
        SIX + ["parallel.cp=2", "parallel.balance=zeppelin", f"checkpoint.resume={tmp_path}/a/step_00000003",
               f"checkpoint.dir={tmp_path}/two"],
        # default bins: one per data rank (dp2 here): the cursor moves 2 rows a step from the saved 6
        ["train.steps=6", "parallel.dp_shard=2", "parallel.balance=tokens",
         f"checkpoint.resume={tmp_path}/a/step_00000003", f"checkpoint.dir={tmp_path}/dp2"],
    ])
    assert sorted(two["losses"]) == [4, 5, 6] and two["cursor"] == 12
    _close(two["losses"], full["losses"], [4, 5, 6])
    assert sorted(dp2["losses"]) == [4, 5, 6] and dp2["cursor"] == 6 + 3 * 2

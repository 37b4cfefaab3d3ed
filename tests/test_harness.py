"""The process-group harness always ends: a deadlocked collective fails the test within the group's
deadline, with every rank's Python stack, instead of hanging CI."""
import time

import pytest
import torch
import torch.distributed as dist

from distributed import GroupFailed, run_group


def _deadlock():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(3600)


def _rank_plus_one():
    return dist.get_rank() + 1


def test_deadlock_fails_within_deadline_with_every_rank_stack():
    started = time.monotonic()
    with pytest.raises(GroupFailed) as failure:
        run_group(2, _deadlock, deadline_s=30)
    elapsed = time.monotonic() - started
    assert elapsed < 75, elapsed
    text = str(failure.value)
    assert "deadline of 30 s" in text
    assert "--- rank 0 ---" in text and "--- rank 1 ---" in text
    rank0, rank1 = text.split("--- rank 1 ---")
    assert "in all_reduce" in rank0 and "in _deadlock" in rank0  # where rank 0 waited
    assert "in _deadlock" in rank1


def test_group_within_deadline_returns_rank0_value():
    assert run_group(2, _rank_plus_one, deadline_s=120) == 1

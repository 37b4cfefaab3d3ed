"""Multi-rank tests run their cases inside one gloo group per world size (see
longtrain.launcher.local_group); a failing rank fails the test with its traceback."""
from longtrain.launcher.local_group import GroupFailed, run_group  # noqa: F401

import os
import sys

# Tests import helpers from this directory (tests/distributed.py).
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

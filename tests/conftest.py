import os
import sys

# tests/reference.py is imported as a plain module by the spec tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# The spec tests run tiny tensor ops, where intra-op threads only add contention: one thread keeps
# the suite fast and its timings independent of what else the machine runs.
torch.set_num_threads(1)

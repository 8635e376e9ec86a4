import os
import sys

# tests/reference.py is imported as a plain module by the spec tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# The fused kernels compile once per variant (seconds each); the suite runs the eager route, which
# gives the same bits, and tests/test_kernels.py checks compiled = eager on every variant it uses.
os.environ.setdefault("ZOPTIM_COMPILE", "0")

import torch  # noqa: E402

# The spec tests run tiny tensor ops, where intra-op threads only add contention: one thread keeps
# the suite fast and its timings independent of what else the machine runs.
torch.set_num_threads(1)

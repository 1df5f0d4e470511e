"""Test-session setup.

Triton kernels can only run on this CPU machine through Triton's interpreter, and whether a kernel is
interpreted is fixed when its module is first imported.  Setting TRITON_INTERPRET=1 before any test module
imports anything makes every import of the kernels (direct or through another package) interpreted.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# The tests use tiny tensors: one intra-op thread avoids thread start-up and contention costs.
torch.set_num_threads(1)

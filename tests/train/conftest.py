"""Tiny models run fastest on one thread (intra-op threads only add contention on a shared small CPU)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

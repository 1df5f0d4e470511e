"""Tiny models run fastest on one thread (intra-op threads only add contention on a shared small CPU)."""

import pytest
import torch

from tests.train.corpus import write_corpus


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus folder shared by a module's tests."""
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))

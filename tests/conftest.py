"""Test configuration: the Triton kernels run under the interpreter on CPU tensors, and torch runs
single-threaded (the tests use small tensors; intra-op threads on a shared 2-core machine made
the loss suite ~8x slower: 78 s vs 9.5 s for test_matches_oracle under load). Set
FASTRECLOSS_TEST_THREADS to change the thread count."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FASTRECLOSS_TEST_THREADS", "1")))


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, fresh per test, so every test sees the same inputs run to run."""
    return torch.Generator().manual_seed(1234)

"""The bench tests' shared set-up."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """CPU timings here are smoke only; one thread keeps OpenMP from spinning on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

import pytest
import torch

from kvshift.train.testing import fork_context, write_tiny_shards


@pytest.fixture(autouse=True)
def _keep_threads():
    # train.threads = 1 in the debug config sets torch's global thread count; give it back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def forkctx():
    """multiprocessing context whose children are forks of a server that imported torch once."""
    return fork_context()

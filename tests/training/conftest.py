import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tiny models of these tests run fastest on one thread, and the test machines are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

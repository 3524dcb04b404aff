import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrix products: threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

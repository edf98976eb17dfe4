import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """One thread: on a loaded 2-core machine OpenMP's spinning threads make tiny models slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

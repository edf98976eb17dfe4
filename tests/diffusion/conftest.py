import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Run the tiny models on one thread: on a loaded 2-core machine, OpenMP's spinning threads make
    millisecond convolutions 100x slower, and these models gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

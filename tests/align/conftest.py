import pytest
import torch

from tests.align.helpers import make_pairs, save_tiny_model


@pytest.fixture(autouse=True)
def _single_thread():
    """One thread: on a loaded 2-core machine OpenMP's spinning threads make tiny convolutions slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eps_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("eps") / "model", "epsilon")


@pytest.fixture(scope="session")
def flow_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("flow") / "model", "flow")


@pytest.fixture(scope="session")
def pairs():
    return make_pairs(24)

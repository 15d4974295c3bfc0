import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="Triton is not supported")
# tiny models run fastest single-threaded, and CI runs two test workers on two cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

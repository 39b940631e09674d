import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def images():
    return torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(0))

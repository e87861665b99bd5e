import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests are small: one intra-op thread keeps them fast and reproducible on 2-core machines."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

import os

# timm / huggingface_hub must never reach the network from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def perturbed_state_dict(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> dict:
    """The model's weights plus noise, so zero-initialised parameters (GRN, biases) take part in a comparison."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}

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


class TinyProbe(torch.nn.Module):
    """A 3x3 conv + linear classifier: the smallest model a training-loop test can fit in a few ms a step."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, x):  # (B, 3, H, W) -> (B, num_classes)
        return self.fc(self.conv(x).mean((2, 3)))

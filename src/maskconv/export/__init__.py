"""Deployment: structural re-parameterization, ONNX / torch.export with an output-parity check."""
from .reparam import reparameterize_model

__all__ = ["reparameterize_model"]

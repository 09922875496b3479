"""Deployment: structural re-parameterization, ONNX / torch.export with an output-parity check."""
from .convert import FORMATS, ExportReport, export_model
from .reparam import reparameterize_model

__all__ = ["FORMATS", "ExportReport", "export_model", "reparameterize_model"]

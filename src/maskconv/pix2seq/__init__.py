"""Pix2Seq (Chen et al., ICLR 2022; v2 NeurIPS 2022): objects as token sequences, on any maskconv backbone.

``vocab`` (token layout, quantization), ``tokenizer`` (sequence construction and decoding), ``model`` (encoder
projection + Transformer decoder with a key/value cache, generation), ``task`` (train / eval / predict).
"""
from .tokenizer import DetectionTokenizer, build_detection_sequences, noise_boxes, token_weights
from .vocab import TASK_TOKENS, Vocab, default_bins

__all__ = ["DetectionTokenizer", "build_detection_sequences", "noise_boxes", "token_weights", "TASK_TOKENS", "Vocab",
           "default_bins"]

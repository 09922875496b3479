"""Pix2Seq (Chen et al., ICLR 2022; v2 NeurIPS 2022): objects as token sequences, on any maskconv backbone.

``vocab`` (token layout, quantization), ``tokenizer`` (detection sequences and decoding), ``model`` (encoder
projection + Transformer decoder with a key/value cache, generation), ``task`` (train / eval / predict).
Pix2Seq v2: ``instance`` (instance segmentation and keypoint sequences), ``caption`` (caption sequences),
``multitask`` (one model for several tasks: ``TaskSet``, packed training rows, per-task evaluation),
``metrics`` (BLEU-4, CIDEr-D, COCO result records of masks and keypoints).
"""
from .tokenizer import DetectionTokenizer, build_detection_sequences, noise_boxes, token_weights
from .vocab import TASK_TOKENS, Vocab, default_bins

__all__ = ["DetectionTokenizer", "build_detection_sequences", "noise_boxes", "token_weights", "TASK_TOKENS", "Vocab",
           "default_bins"]

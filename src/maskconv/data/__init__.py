"""Datasets and transforms."""
from .photos import IMAGENET_MEAN, IMAGENET_STD, bundled_photos, default_norm, load_images

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "bundled_photos", "default_norm", "load_images"]

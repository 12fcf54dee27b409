"""The fine-tuning stage: dataset checks, augmentation, caches, LoRA training, search and evaluation."""

__version__ = "0.1.0"

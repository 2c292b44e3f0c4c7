"""Setup for every test and doctest (``tests/`` and the doctests in ``chainopt/``): offline
Hugging Face, and DeepSpeed told it is on a CPU where there is no GPU (its auto-detection prints
a warning to stdout, which a doctest would read as output)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

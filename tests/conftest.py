"""Shared fixtures: the synthetic benchmark and a briefly pretrained backbone, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep the 2-core CI machine responsive and runs reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("CGH_NUM_WORKERS", "0")

ROOT = Path(__file__).resolve().parent.parent

"""Suite-wide settings: deterministic single-threaded torch (fast and stable on 2 cores), hypothesis
profile, and a weight cache inside the checkout so tests never touch the user's cache; trained zoo
weights are shared by all tests and workers of a run (writes are atomic)."""

import os
from pathlib import Path

import torch
from hypothesis import settings

os.environ.setdefault("SLIMFX_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".slimfx-test-cache"))
torch.set_num_threads(1)

settings.register_profile("slimfx", deadline=None, max_examples=20, derandomize=True, print_blob=True)
settings.load_profile("slimfx")

"""The third-party suite (`make test-thirdparty`, in .venv-thirdparty): real architectures from torchvision,
timm and transformers, random init, nothing downloaded. The main suite (`make test`) does not collect this
folder; run alone in an environment without torchvision, every module here skips."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_third_party.check_model: the sweep's own judgement
torch.set_num_threads(1)  # two pytest workers on two cores

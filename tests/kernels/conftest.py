"""Kernel tests run the Triton kernels in the interpreter on CPU (on a CUDA machine, compiled on the GPU).

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

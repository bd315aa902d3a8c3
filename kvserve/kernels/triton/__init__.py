"""Triton kernels for the GPU fast path.

Importing this package never imports triton; the kernel modules do. `triton_importable()` says
whether they can be loaded, `fused_enabled(x)` whether the fused layer kernels should run on
a tensor (CUDA only: on the CPU the torch code is both the reference and the faster path).
Set ``KVSERVE_DISABLE_TRITON=1`` to keep every layer on torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_importable() -> bool:
    """True when the triton package is installed (it is optional)."""
    return importlib.util.find_spec("triton") is not None


def fused_enabled(x: torch.Tensor) -> bool:
    """Whether a layer should take its fused Triton kernel for tensor `x`."""
    return x.is_cuda and triton_importable() and os.environ.get("KVSERVE_DISABLE_TRITON", "0") != "1"

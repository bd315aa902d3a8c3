"""Attention backends by name, and the one backend a model's layers share."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.errors import InvalidRequestError
from kvserve.kernels import cpu as native_cpu
from kvserve.kernels.triton import triton_importable
from kvserve.layers.attention.base import AttentionBackend
from kvserve.layers.attention.layer import Attention
from kvserve.layers.attention.metadata import AttentionMetadata

from kvserve.config import ATTENTION_BACKENDS


def make_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """A backend by name: "torch" (the reference), "cpu" (native kernels), "triton", or "auto"
    (Triton on CUDA when it is installed, the native kernels on a CPU that has them, else torch)."""
    if name not in ATTENTION_BACKENDS:
        raise InvalidRequestError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        name = "triton" if cuda and triton_importable() else "cpu" if not cuda and native_cpu.available() else "torch"
    if name == "torch":
        from kvserve.layers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "cpu":
        if cuda or not native_cpu.available():
            raise InvalidRequestError("attention_backend='cpu' needs a CPU device and the native kernels "
                                      "(a C compiler and a supported ISA)")
        from kvserve.layers.attention.cpu_native import CPUNativeAttentionBackend

        return CPUNativeAttentionBackend()
    if not triton_importable():
        raise InvalidRequestError("attention_backend='triton' needs the triton package")
    from kvserve.kernels.triton.backend import TritonAttentionBackend

    return TritonAttentionBackend()


def set_attention_backend(model: nn.Module, backend: AttentionBackend) -> AttentionBackend:
    """Give every Attention layer of `model` the same backend instance (one plan serves them all)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
    return backend


def attention_backend_of(model: nn.Module) -> AttentionBackend | None:
    """The backend shared by the model's Attention layers (None when it has none, e.g. a pipeline stage
    without layers); raises if they differ, since one plan per step must serve them all."""
    backends = {id(m.backend): m.backend for m in model.modules() if isinstance(m, Attention)}
    if len(backends) > 1:
        raise ValueError("the model's Attention layers have different backends: use set_attention_backend")
    return next(iter(backends.values()), None)


def prepare_attention(model: nn.Module, meta: AttentionMetadata) -> AttentionMetadata:
    """Plan the step once for every layer of `model` (sets and returns `meta` with its plan)."""
    backend = attention_backend_of(model)
    if backend is not None:
        meta.plan = backend.prepare(meta)
    return meta

"""Shared weight-loading helper."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kvserve.errors import ModelLoadError

# what a loader may attach to a checkpoint tensor for the quantizers (loader/gguf.py): its own
# codes and scales, or an int8 table for an embedding or LM head
CARRIED = ("gguf_parts", "int8_rows")


def _carry(src: torch.Tensor, dst: torch.Tensor) -> None:
    for attr in CARRIED:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params: tuple[tuple[str, str, object], ...] = (),
    dtype: torch.dtype | None = None,
    on_loaded: Callable[[nn.Module, str], None] | None = None,
) -> None:
    """Put checkpoint tensors into a model built on the meta device; every parameter must be covered.

    A whole tensor becomes the parameter itself (no copy); a shard of a fused parameter is
    copied into its slice by the owning module's `weight_loader(param, tensor, shard_id)`.
    `on_loaded(module, attr)` runs as soon as a parameter is complete (e.g. to quantize a layer
    while the next one loads, so the float model never exists whole).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        shard_id = None
        for ckpt_frag, fused_frag, sid in stacked_params:
            if ckpt_frag in name:
                name, shard_id = name.replace(ckpt_frag, fused_frag), sid
                break
        if name not in params:
            if tied and name == "lm_head.weight":
                continue  # some tied checkpoints still carry a copy
            raise ModelLoadError(name, "unexpected tensor in checkpoint")
        mod_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(mod_name)
        param = getattr(owner, attr)
        sharder = getattr(param, "shard_loader", None)  # tensor parallelism: keep this rank's slice only
        if sharder is not None:
            tensor = sharder(tensor, shard_id)
        if not isinstance(tensor, torch.Tensor):  # a lazy checkpoint slice (loader/hf.py): read it now
            tensor = tensor.full()
        target_dtype = dtype or tensor.dtype
        if shard_id is None:
            if tuple(param.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    name, f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}"
                )
            new = nn.Parameter(tensor.to(target_dtype).contiguous(), requires_grad=False)
            _carry(tensor, new)
            setattr(owner, attr, new)
            if on_loaded is not None:
                on_loaded(owner, attr)
            continue
        if param.is_meta:
            param = nn.Parameter(torch.empty(param.shape, dtype=target_dtype), requires_grad=False)
            param.loaded_shards = set()
            if sharder is not None:
                param.shard_loader = sharder
            setattr(owner, attr, param)
        converted = tensor.to(target_dtype)
        if converted is not tensor:
            _carry(tensor, converted)
        owner.weight_loader(param, converted, shard_id)
        param.loaded_shards.add(shard_id)
        if on_loaded is not None and param.loaded_shards == set(owner.shard_offsets):
            on_loaded(owner, attr)
    if tied:
        model.tie_weights()
    for name, param in model.named_parameters():
        mod_name, _, attr = name.rpartition(".")
        shards = getattr(model.get_submodule(mod_name), "shard_offsets", None)
        if param.is_meta:
            raise ModelLoadError(name, "checkpoint lacks this tensor")
        loaded = getattr(param, "loaded_shards", None)
        if loaded is not None and shards is not None and set(shards) - loaded:
            raise ModelLoadError(name, f"checkpoint lacks shard(s) {sorted(map(str, set(shards) - loaded))}")

"""Calibration: run a float model on text one decoder layer at a time and collect, for each linear
layer of that decoder layer, the statistics of its inputs X the calibrated methods need:
H = X^T X (GPTQ, SparseGPT, and every output-error measure: ||dW X^T||^2 = tr(dW H dW^T)),
sum |x| per input channel (AWQ) and ||x_c||^2 = diag(H) (Wanda).

Only one layer's statistics and the hidden states of the calibration tokens ([tokens, hidden])
exist at a time: after `process` has changed a layer (scaled, quantized, pruned), the layer is run
again to give the next one its inputs, so later layers calibrate on what the compressed earlier
layers really produce (as GPTQ and SparseGPT do).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kvserve.errors import InvalidRequestError
from kvserve.layers.attention import AttentionMetadata
from kvserve.loader import LoadedModel

logger = logging.getLogger(__name__)

CHUNK = 512
# the linear layers of a Llama-family decoder layer, by their kvserve module path
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass
class LinearStats:
    h: torch.Tensor  # float64 [K, K]: sum over tokens of x x^T
    abs_sum: torch.Tensor  # float64 [K]: sum over tokens of |x|
    tokens: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def col_norm(self) -> torch.Tensor:
        """||X_c||_2 per input channel c."""
        return torch.diag(self.h).clamp(min=0).sqrt()

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h += (x.t() @ x).double()
        self.abs_sum += x.abs().sum(0).double()
        self.tokens += x.shape[0]


def calibration_chunks(lm: LoadedModel, text: str, n_tokens: int, chunk: int = CHUNK) -> list[list[int]]:
    """The first `n_tokens` tokens of `text`, in chunks of `chunk` (the last may be shorter), each
    starting with BOS where the model uses one (chunks never exceed the model's context)."""
    chunk = min(chunk, lm.config.max_position_embeddings)
    if n_tokens < 1:
        raise InvalidRequestError(f"--calib-tokens must be positive, not {n_tokens}")
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 16:
        raise InvalidRequestError(f"the calibration text has {len(ids)} tokens; need at least 16")
    if len(ids) < n_tokens:
        logger.warning("calibration text has %d tokens, fewer than the %d asked for: using them all", len(ids), n_tokens)
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.add_bos else None
    head = [bos] if bos is not None else []
    chunks, at, left = [], 0, n_tokens
    while left > len(head) and at < len(ids):
        take = min(chunk, left) - len(head)
        chunks.append(head + ids[at : at + take])
        at, left = at + take, left - len(chunks[-1])
    return chunks


def progress(total: int, desc: str):  # noqa: ANN201 - a tqdm bar
    """A tqdm bar on stderr when it is a terminal; in a log or a pipe nothing (no carriage-return
    redraws: the command prints its own summary lines)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(), mininterval=0.5,
                dynamic_ncols=True)


def decoder_layers(lm: LoadedModel) -> nn.ModuleList:
    if lm.config.architecture == "gpt2" or not hasattr(lm.model, "model"):
        raise InvalidRequestError(f"compression supports Llama-family models, not {lm.config.architecture}")
    return lm.model.model.layers


@torch.inference_mode()
def run_layers(lm: LoadedModel, chunks: list[list[int]] | None,
               process: Callable[[int, nn.Module, dict[str, LinearStats] | None], None], desc: str,
               num_layers: int | None = None) -> None:
    """For each decoder layer in order (the first `num_layers`; None: all): collect its linears'
    input statistics on `chunks` (None: no calibration, process gets None), call
    process(index, layer, stats), then run the (changed) layer to get the next layer's inputs."""
    layers = list(decoder_layers(lm))[:num_layers]
    x = positions = meta = None
    if chunks is not None:
        ids = torch.tensor([t for c in chunks for t in c])
        positions = torch.cat([torch.arange(len(c)) for c in chunks])
        meta = AttentionMetadata.for_prefill([len(c) for c in chunks])
        x = lm.model.model.embed_tokens(ids)
    bar = progress(len(layers), desc)
    for i, layer in enumerate(layers):
        stats = None
        if x is not None:
            stats, hooks = {}, []
            for name in LINEARS:
                mod = layer.get_submodule(name)
                stats[name] = LinearStats(torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64),
                                          torch.zeros(mod.in_features, dtype=torch.float64))
                hooks.append(mod.register_forward_pre_hook(lambda m, inp, s=stats[name]: s.add(inp[0])))
            try:
                layer(positions, x, None, meta)
            finally:
                for hk in hooks:
                    hk.remove()
        process(i, layer, stats)
        if x is not None:
            x = layer(positions, x, None, meta)
        bar.update(1)
    bar.close()

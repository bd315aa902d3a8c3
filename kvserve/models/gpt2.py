"""GPT-2: learned positions, pre-LayerNorm, fused c_attn, GELU MLP, tied LM head."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.layers.activation import get_act
from kvserve.layers.attention import Attention, AttentionMetadata, KVCache
from kvserve.layers.embedding import LMHead, VocabEmbedding
from kvserve.layers.linear import Linear
from kvserve.layers.norm import LayerNorm
from kvserve.models.utils import load_named_weights

# HF stores these as Conv1D, i.e. [in, out]; our Linear is [out, in].
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden_size
        self.c_attn = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.c_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.attn = Attention(cfg.num_heads, cfg.head_dim, cfg.num_heads)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.hidden, dim=-1)
        return self.c_proj(self.attn(q, k, v, kv_cache, meta))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = get_act(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = VocabEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Backbone(cfg)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches is not None else None, meta)
        return self.transformer.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None,
                     on_loaded: Callable[[nn.Module, str], None] | None = None) -> None:
        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, t in weights:
                if name.endswith((".attn.bias", ".attn.masked_bias")):
                    continue  # causal-mask buffers of old checkpoints
                if not name.startswith(("transformer.", "lm_head.")):
                    name = "transformer." + name
                if name.endswith(_CONV1D):
                    t = t.t()
                yield name, t

        load_named_weights(self, renamed(), dtype=dtype, on_loaded=on_loaded)

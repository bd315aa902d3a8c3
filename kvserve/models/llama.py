"""Llama-family decoder: Llama 2/3.x, SmolLM2, TinyLlama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are
fused into one projection each; `load_weights` routes the separate checkpoint tensors into
their slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.layers.activation import SiluAndMul
from kvserve.layers.attention import Attention, AttentionMetadata, KVCache
from kvserve.layers.embedding import LMHead, VocabEmbedding
from kvserve.layers.linear import Linear, MergedLinear
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding
from kvserve.models.utils import load_named_weights


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}, bias=cfg.attention_bias
        )
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.attn = Attention(cfg.num_heads, cfg.head_dim, cfg.num_kv_heads)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache | None, meta: AttentionMetadata
    ) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(T, cfg.num_heads, cfg.head_dim)
        k = k.reshape(T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {0: cfg.intermediate_size, 1: cfg.intermediate_size})
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary_emb)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache | None, meta: AttentionMetadata
    ) -> torch.Tensor:
        a = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        h, x = self.post_attention_layernorm(a, residual=x)  # x + a and its norm, one kernel on CUDA
        return x + self.mlp(h)


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim,
            int(cfg.head_dim * cfg.partial_rotary_factor),
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary_emb) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard id)
    stacked_params = (
        (".q_proj.", ".qkv_proj.", "q"),
        (".k_proj.", ".qkv_proj.", "k"),
        (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    )

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBackbone(cfg)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat token batch."""
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(positions, x, kv_caches[i] if kv_caches is not None else None, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None,
                     on_loaded: Callable[[nn.Module, str], None] | None = None) -> None:
        load_named_weights(self, weights, self.stacked_params, dtype, on_loaded)

    def set_rope_freq_factors(self, factors: torch.Tensor) -> None:
        self.model.rotary_emb.set_freq_factors(factors)

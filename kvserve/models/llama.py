"""Llama-family decoder: Llama 2/3.x, SmolLM2, TinyLlama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are
fused into one projection each; `load_weights` routes the separate checkpoint tensors into
their slices.

Under tensor parallelism each rank builds its shard (its heads, its share of the MLP and the
vocabulary, see layers/linear.py); under pipeline parallelism each stage builds only its
layers (the others are empty placeholders, so parameter names stay those of the checkpoint),
takes the previous stage's hidden states as input and returns its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.distributed.parallel_state import get_state, split_heads, stage_layers
from kvserve.layers.activation import SiluAndMul
from kvserve.layers.attention import Attention, AttentionMetadata, KVCache
from kvserve.layers.embedding import LMHead, VocabEmbedding
from kvserve.layers.linear import ColumnParallelMergedLinear, RowParallelLinear
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding
from kvserve.models.utils import load_named_weights


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        st = get_state()
        self.num_heads, self.num_kv_heads, kv0 = split_heads(cfg.num_heads, cfg.num_kv_heads, st.tp_size, st.tp_rank)
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.qkv_proj = ColumnParallelMergedLinear(
            cfg.hidden_size,
            {"q": (self.q_size, st.tp_rank * self.q_size), "k": (self.kv_size, kv0 * cfg.head_dim),
             "v": (self.kv_size, kv0 * cfg.head_dim)},
            bias=cfg.attention_bias,
        )
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.attn = Attention(self.num_heads, cfg.head_dim, self.num_kv_heads)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache | None, meta: AttentionMetadata
    ) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, cfg.head_dim)
        k = k.reshape(T, self.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        st = get_state()
        n = cfg.intermediate_size // st.tp_size
        self.gate_up_proj = ColumnParallelMergedLinear(cfg.hidden_size, {0: (n, st.tp_rank * n), 1: (n, st.tp_rank * n)})
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)
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
        st = get_state()
        self.start_layer, self.end_layer = stage_layers(cfg.num_layers, st.pp_size, st.pp_rank)
        # the last stage keeps the embedding when the LM head is tied to it
        keep_embed = st.is_first_stage or (st.is_last_stage and cfg.tie_word_embeddings)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size) if keep_embed else nn.Identity()
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim,
            int(cfg.head_dim * cfg.partial_rotary_factor),
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, self.rotary_emb) if self.start_layer <= i < self.end_layer else nn.Identity()
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if st.is_last_stage else nn.Identity()


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
        st = get_state()
        self.is_first_stage, self.is_last_stage = st.is_first_stage, st.is_last_stage
        self.model = LlamaBackbone(cfg)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size) if st.is_last_stage else nn.Identity()
        # the KV cache this rank holds (executor/reference.py allocates it)
        self.num_local_layers = self.model.end_layer - self.model.start_layer
        self.num_local_kv_heads = split_heads(cfg.num_heads, cfg.num_kv_heads, st.tp_size, st.tp_rank)[1]
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.is_last_stage:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat token batch (a pipeline stage after the first takes
        the previous stage's `hidden_states` and, unless it is the last, returns its own unnormed)."""
        m = self.model
        x = m.embed_tokens(input_ids) if hidden_states is None else hidden_states
        start = m.start_layer
        for i in range(start, m.end_layer):
            x = m.layers[i](positions, x, kv_caches[i - start] if kv_caches is not None else None, meta)
        return m.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None,
                     on_loaded: Callable[[nn.Module, str], None] | None = None) -> None:
        load_named_weights(self, (w for w in weights if self._owns(w[0])), self.stacked_params, dtype, on_loaded)

    def _owns(self, name: str) -> bool:
        """Whether this pipeline stage holds the checkpoint tensor `name` (always, without PP)."""
        m = self.model
        if name.startswith("model.layers."):
            return m.start_layer <= int(name.split(".")[2]) < m.end_layer
        if name.startswith("model.embed_tokens."):
            return not isinstance(m.embed_tokens, nn.Identity)
        if name.startswith(("model.norm.", "lm_head.")):
            return self.is_last_stage
        return True

    def set_rope_freq_factors(self, factors: torch.Tensor) -> None:
        self.model.rotary_emb.set_freq_factors(factors)

"""NativeDecoder: a Llama-family decode step with native int8/int4/k-quant or float32 weights as one native CPU call."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.layers.attention import AttentionMetadata, KVCache
from kvserve.quant.int4 import Int4Weight
from kvserve.quant.wide import WideWeight


class NativeDecoder:
    """A step of a Llama-family model with native quantized or float32 weights in native calls
    (`kvserve.kernels.cpu.llama_decode`), instead of ~25 torch ops per layer.

    Built by the model runner when `supports()` holds. `forward` runs one-token rows (decodes, speculative
    verify rows, prompt tokens below position 64, each over its own prefix); `extend` runs the rest of
    prompt chunks as extends of the paged cache, when `extends` holds (quantized weights); the runner keeps
    the torch path for what is left.
    """

    def __init__(self, model: nn.Module, kv_caches: list[KVCache]) -> None:
        from kvserve.kernels import cpu as native

        self._native = native
        cfg = model.config
        backbone = model.model
        first = backbone.layers[0].self_attn
        self.norm = backbone.norm
        self.embed = backbone.embed_tokens
        rot = backbone.rotary_emb
        # the final norm runs inside the call (the C side has one eps for every norm)
        self.final_in_call = backbone.norm.eps == backbone.layers[0].input_layernorm.eps
        self._keep = [rot.cos_cached, rot.sin_cached, kv_caches]  # the structs hold raw pointers
        self.model_args = native.ModelArgs(
            hidden=cfg.hidden_size, n_heads=cfg.num_heads, n_kv=cfg.num_kv_heads, head_dim=cfg.head_dim,
            rot_dim=rot.rotary_dim, inter=cfg.intermediate_size, block_size=kv_caches[0].block_size,
            eps=backbone.layers[0].input_layernorm.eps, attn_scale=first.attn.scale,
            cache_dtype=native.cache_dtype_code(kv_caches[0].k.dtype),
            cos=rot.cos_cached.data_ptr(), sin=rot.sin_cached.data_ptr(),
            final_norm=self.norm.weight.data_ptr() if self.final_in_call else None)
        layers = (native.LayerArgs * len(backbone.layers))()
        for la, layer, cache in zip(layers, backbone.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            la.ln1 = layer.input_layernorm.weight.data_ptr()
            la.ln2 = layer.post_attention_layernorm.weight.data_ptr()
            la.q_norm = attn.q_norm.weight.data_ptr() if cfg.qk_norm else None
            la.k_norm = attn.k_norm.weight.data_ptr() if cfg.qk_norm else None
            for name, lin in (("qkv", attn.qkv_proj), ("o", attn.o_proj), ("gate_up", mlp.gate_up_proj),
                              ("down", mlp.down_proj)):
                w = lin.qweight
                bias = None if lin.bias is None else lin.bias.data_ptr()
                if w is None:  # float32, read in place (supports() checked it)
                    args = native.QLinearArgs(2, lin.weight.data_ptr(), None, None, bias, lin.out_features,
                                              lin.in_features)
                elif isinstance(w, Int4Weight):
                    args = native.QLinearArgs(1, w.q.data_ptr(), None, None, bias, w.out_features, w.in_features)
                elif isinstance(w, WideWeight):  # kind = the codes' bits (llama_decode.c)
                    args = native.QLinearArgs(w.bits, w.q.data_ptr(), None, None, bias, w.out_features, w.in_features)
                else:
                    args = native.QLinearArgs(0, w.q.data_ptr(), w.scale.data_ptr(), w.corr.data_ptr(), bias,
                                              w.out_features, w.in_features)
                setattr(la, name, args)
            la.k_cache, la.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
            la.k_scale = cache.k_scale.data_ptr() if cache.quantized else None
            la.v_scale = cache.v_scale.data_ptr() if cache.quantized else None
        self.layers = layers
        # prompt chunks too (extend), unless float32 weights: their few-row kernel is for decode-sized steps,
        # and torch's GEMM is faster over a prompt's hundreds of rows (512: 1,021 against 674 tok/s)
        self.extends = all(getattr(la, name).kind != 2 for la in layers for name in ("qkv", "o", "gate_up", "down"))

    @staticmethod
    def supports(model: nn.Module, kv_caches: list[KVCache]) -> bool:
        """Llama-family, float32 activations, native quantized or float32 weights on every layer's linears
        (float32 ones by the few-row kernel, which reads a weight once for all the step's rows), CPU caches."""
        from kvserve.kernels import cpu as native
        from kvserve.layers.attention.cpu_native import CPUNativeAttentionBackend
        from kvserve.models.llama import LlamaForCausalLM

        if not isinstance(model, LlamaForCausalLM) or not kv_caches or not native.available():
            return False
        if getattr(model.model.embed_tokens, "tp_size", 1) > 1 or not model.is_last_stage or model.model.start_layer:
            return False  # tensor/pipeline parallel: the torch path with its collectives
        cfg = model.config
        cache = kv_caches[0]
        if (cfg.hidden_act != "silu" or cfg.head_dim % 16 or cfg.num_heads % cfg.num_kv_heads
                or cache.k.device.type != "cpu" or native.cache_dtype_code(cache.k.dtype) is None
                or model.model.norm.weight.dtype != torch.float32):
            return False
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(attn.attn.backend, CPUNativeAttentionBackend):
                return False
            for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                if lin.qweight is None:
                    if lin.weight.dtype != torch.float32 or not lin.weight.is_contiguous():
                        return False
                elif not lin.qweight.native:
                    return False
                if lin.bias is not None and lin.bias.dtype != torch.float32:
                    return False
        return True

    def extend(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states of prompt chunks (each sequence's new tokens attend as an extend of its
        paged cache, `meta` as the op-by-op forward takes it) in one native call."""
        assert meta.slot_mapping is not None and meta.block_tables is not None
        x = self.embed(input_ids).contiguous()
        i32 = torch.int32
        self._native.llama_extend(self.model_args, self.layers, x, positions.contiguous(),
                                  meta.slot_mapping.contiguous(), meta.block_tables.contiguous(),
                                  meta.query_start_loc[:-1].to(i32).contiguous(),
                                  torch.tensor(meta.query_lens_cpu, dtype=i32),
                                  torch.tensor(meta.seq_lens_cpu, dtype=i32))
        return x if self.final_in_call else self.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [B, hidden] of B one-token rows: a decode, or a prompt token
        whose row's block table and seq_len (its position + 1) make its own prefix its context."""
        assert meta.slot_mapping is not None and meta.block_tables is not None
        x = self.embed(input_ids).contiguous()
        self._native.llama_decode(self.model_args, self.layers, x, positions.contiguous(),
                                  meta.slot_mapping.contiguous(), meta.block_tables.contiguous(),
                                  meta.seq_lens.contiguous())
        return x if self.final_in_call else self.norm(x)

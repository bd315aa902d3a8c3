"""`kvserve quantize`'s other output: a Hugging Face model directory whose linears are in the GPTQ
checkpoint layout (quant/gptq_format.py), self-contained (config, tokenizer, weights) so kvserve, and
the engines that read GPTQ checkpoints, load it offline.

Written: config.json (the source's model config and a quantization_config block; quantize_config.json
holds the same block, where AutoGPTQ looks for it), tokenizer.json, tokenizer_config.json and
generation_config.json from the tokenizer kvserve built for the source, and model.safetensors: each
decoder layer's linears as qweight/qzeros/scales/g_idx under their Hugging Face names (kvserve's fused
qkv_proj and gate_up_proj split back into q/k/v and gate/up), every other tensor (embedding, norms,
biases, an untied LM head) in float32 as the quantized model holds it (AWQ rescales the norms).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from kvserve.loader import LoadedModel
from kvserve.quant.gptq_format import quantization_config, to_gptq

# kvserve architecture key -> (HF architectures entry, model_type)
HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                    "qwen3": ("Qwen3ForCausalLM", "qwen3")}


def hf_config(lm: LoadedModel, quant: dict[str, object]) -> dict[str, object]:
    """config.json for the model as kvserve's HF loader (loader/hf.py) and transformers read it."""
    c, tok = lm.config, lm.tokenizer
    if c.architecture not in HF_ARCHITECTURES:
        raise ValueError(f"{c.architecture} models are not written as safetensors directories yet")
    arch, model_type = HF_ARCHITECTURES[c.architecture]
    out: dict[str, object] = {
        "architectures": [arch], "model_type": model_type, "_name_or_path": c.name,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
        "hidden_act": c.hidden_act, "torch_dtype": "float16",
        "bos_token_id": tok.bos_token_id, "eos_token_id": _one_or_list(tok.eos_token_ids),
        "quantization_config": quant,
    }
    if c.rope_scaling:
        out["rope_scaling"] = c.rope_scaling
    if c.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    return out


def _one_or_list(ids: list[int]) -> int | list[int] | None:
    return ids[0] if len(ids) == 1 else (list(ids) or None)


def _backend_with_bos(tok):  # noqa: ANN001, ANN202 - kvserve's Tokenizer -> a tokenizers.Tokenizer
    """The tokenizer kvserve runs, with a post-processor that prepends BOS where the model wants one:
    kvserve's encode() adds BOS itself, transformers leaves it to tokenizer.json (kvserve's HF loader
    reads either way)."""
    if not tok.add_bos or tok.bos_token_id is None:
        return tok.backend
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(tok.backend.to_str())
    bos = backend.id_to_token(tok.bos_token_id)
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.bos_token_id)])
    return backend


def write_tokenizer(lm: LoadedModel, out: Path) -> None:
    """tokenizer.json (the tokenizer kvserve runs), tokenizer_config.json (special tokens, BOS, chat
    template) and generation_config.json (BOS and EOS ids): what Tokenizer.from_hf_dir reads back."""
    tok = lm.tokenizer
    _backend_with_bos(tok).save(str(out / "tokenizer.json"))
    tcfg: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos,
                               "model_max_length": lm.config.max_position_embeddings, **tok.special_tokens}
    if tok.chat_template:
        tcfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": _one_or_list(tok.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _hf_shards(model: torch.nn.Module, path: str) -> list[tuple[str, object]]:
    """(HF module path, shard id or None) of a kvserve linear: a fused one's projections in its rows' order."""
    head, _, leaf = path.rpartition(".")
    shards = [(f"{head}.{ck.strip('.')}", sid) for ck, fused, sid in getattr(model, "stacked_params", ())
              if fused.strip(".") == leaf]
    return shards or [(path, None)]


def _rows(t: torch.Tensor, lin: torch.nn.Module, sid: object) -> torch.Tensor:
    if sid is None:
        return t
    off, size = lin.shard_offsets[sid]
    return t[off : off + size]


def gptq_tensors(lm: LoadedModel, comp, bits: int) -> dict[str, torch.Tensor]:  # noqa: ANN001 - a Compressed
    """Every tensor of the directory's model.safetensors, by HF name."""
    from kvserve.quant.calibrate import LINEARS

    model = lm.model
    for i in range(lm.config.num_layers):
        if any(f"model.layers.{i}.{name}" not in comp.parts for name in LINEARS):
            raise ValueError(f"layer {i} was not compressed")
    out: dict[str, torch.Tensor] = {}
    done = set()
    for path, parts in comp.parts.items():
        lin = model.get_submodule(path)
        for hf, sid in _hf_shards(model, path):
            p = parts.rows(lambda x, lin=lin, sid=sid: _rows(x, lin, sid))
            out.update({f"{hf}.{k}": v for k, v in to_gptq(p, bits, hf).items()})
            if lin.bias is not None:
                out[f"{hf}.bias"] = _rows(lin.bias.detach().float(), lin, sid).contiguous()
        done.update({f"{path}.weight", f"{path}.bias"})
    for name, p in model.named_parameters():  # a tied LM head is the embedding's parameter: listed once
        if name not in done:
            out[name] = p.detach().float().contiguous()
    return out


# the files of every directory written; the tokenizer files, written from kvserve's tokenizer for a GGUF
# source (the first three) or copied from an HF source where it has them; a directory holding only
# these may be written again
OWN_FILES = ("config.json", "quantize_config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
FILES = OWN_FILES + TOKENIZER_FILES


def write_gptq_dir(lm: LoadedModel, comp, out: str | Path, bits: int, group: int,  # noqa: ANN001 - a Compressed
                   symmetric: bool, source: Path | None = None) -> list[str]:
    """Write the quantized model `lm` (its codes in `comp`, every decoder layer's linears) as a HF
    directory in the GPTQ layout; returns the names of the files written. `source`: the model's own
    HF directory, whose config.json (plus the quantization_config) and tokenizer files are kept as
    they are; else both come from what kvserve read (a GGUF's metadata). ValueError (before anything
    is written) where a grid cannot be held exactly."""
    from safetensors.torch import save_file

    out = Path(out)
    quant = quantization_config(bits, group, symmetric)
    if source is None:
        config = hf_config(lm, quant)
    else:
        config = {**json.loads((source / "config.json").read_text()), "quantization_config": quant}
    tensors = gptq_tensors(lm, comp, bits)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n")
    if source is None:
        write_tokenizer(lm, out)
        return [*OWN_FILES, *TOKENIZER_FILES[:3]]
    copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
    for f in copied:
        shutil.copyfile(source / f, out / f)
    return [*OWN_FILES, *copied]


def check_gptq_shapes(lm: LoadedModel, bits: int, group: int) -> None:
    """ValueError naming the first linear the layout cannot hold at `bits` in groups of `group`: inputs
    that are not whole groups, or inputs / outputs (each projection of a fused one) that do not fill
    whole int32 words; or an architecture not written as a directory yet."""
    from kvserve.quant.calibrate import LINEARS

    if lm.config.architecture not in HF_ARCHITECTURES:
        raise ValueError(f"{lm.config.architecture} models are not written as safetensors directories yet")
    layer = lm.model.model.layers[0]  # every decoder layer has the same shapes
    for path in LINEARS:
        lin = layer.get_submodule(path)
        k = lin.in_features
        if k % group:
            raise ValueError(f"--group-size {group} does not divide {path}'s {k} inputs")
        for hf, sid in _hf_shards(lm.model, f"model.layers.0.{path}"):
            n = lin.shard_offsets[sid][1] if sid is not None else lin.out_features
            if k * bits % 32 or n * bits % 32:
                raise ValueError(f"{hf.removeprefix('model.layers.0.')} [{n}, {k}] does not pack in {bits}-bit "
                                 f"GPTQ words (inputs and outputs multiples of {32 // math.gcd(32, bits)})")

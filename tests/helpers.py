"""Test helpers: tiny random-weight Hugging Face checkpoints and GGUF files, written to temp dirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kvserve.engine.scheduler import RunnerOutput
from kvserve.layers.attention import AttentionMetadata

TINY_VOCAB = 320


def tiny_tokenizer_json(path: Path) -> tuple[int, int]:
    """A byte-level BPE tokenizer (256 byte symbols + a few merges + 2 specials) as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tk.save(str(path / "tokenizer.json"))
    bos, eos = tk.token_to_id("<s>"), tk.token_to_id("</s>")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                    "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"})
    )
    return bos, eos


def make_tiny_hf(path: Path, arch: str, seed: int = 0, **overrides: object) -> Path:
    """Save a tiny random model of `arch` (llama, mistral, qwen2, qwen3, gpt2) as a HF directory."""
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    bos, eos = tiny_tokenizer_json(path)
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=bos, eos_token_id=eos)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    else:
        llama_like = dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, **common,
        )
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[arch]
        if arch == "qwen3":
            llama_like["head_dim"] = 32
        cfg = cls(**{**llama_like, **overrides})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random weights at init scale are tiny; widen them so logits differ clearly
        for p in model.parameters():
            if p.dim() >= 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    model.save_pretrained(path, safe_serialization=True)
    return path


def run_engine(eng, prompts: list, params, check_invariants: bool = False) -> list[list[int]]:
    """Add prompts as r0, r1, ... (one SamplingParams, or one per prompt), step the engine until all
    finish, and return each request's output token ids in prompt order; with `check_invariants`, the KV
    block invariants after every step and no block in use at the end."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", p, sp)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        if check_invariants:
            eng.kv.check_invariants()
    if check_invariants:
        assert eng.kv.pool.num_used_blocks == 0
    return [done[f"r{i}"] for i in range(len(prompts))]


def run_prefill(model: torch.nn.Module, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every position of each sequence, all in one flat batch without a KV cache."""
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.tensor([p for s in seqs for p in range(len(s))])
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, pos, AttentionMetadata.for_prefill([len(s) for s in seqs])))
    return list(logits.split([len(s) for s in seqs]))


def hf_greedy(hf, prompts: list[list[int]], n: int, eos: list[int] | None = None) -> list[list[int]]:
    """transformers' greedy continuations of `prompts`, one left-padded batch: up to `n` tokens each, cut
    after the first of `eos` (exactly `n` when `eos` is None). Batched once for speed: on the default model
    the padded batch gives the tokens of one generate() per prompt (checked), in a quarter of the time."""
    width = max(map(len, prompts))
    pad = eos[0] if eos else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stop = dict(eos_token_id=eos) if eos else dict(min_new_tokens=n)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad, **stop)
    rows = out[:, width:].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] if eos else row for row in rows]


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (the inverse of kvserve's unpermute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_tiny_llama_gguf(hf_path: Path, out: Path, qtype: str | dict[str, str] = "F32", arch: str = "llama",
                          extra_tensors: dict | None = None, chat_template: str | None = None) -> Path:
    """Convert a tiny HF Llama directory to GGUF the way llama.cpp's converter lays it out.

    qtype: the 2-D tensors' type, or {name part: type} with "*" for the rest (e.g. {"attn_v": "Q6_K",
    "*": "Q4_K"}, as llama.cpp's Q4_K_M mixes them); K-quants need rows of 256k values. chat_template: stored
    as tokenizer.chat_template (none by default)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_path / "config.json").read_text())
    tok = json.loads((hf_path / "tokenizer.json").read_text())
    t = load_file(str(hf_path / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    vocab = tok["model"]["vocab"]
    tokens = [None] * TINY_VOCAB
    for s, i in vocab.items():
        tokens[i] = s
    types = [1] * TINY_VOCAB
    for a in tok["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3
    for i in range(TINY_VOCAB):
        if tokens[i] is None:
            tokens[i], types[i] = f"[PAD{i}]", 5
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(vocab.get("<s>", tokens.index("<s>")))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def add(name: str, arr: np.ndarray) -> None:
        if name in (extra_tensors or {}):
            return  # replaced below
        arr = np.ascontiguousarray(arr.astype(np.float32))
        kind = qtype if isinstance(qtype, str) else next(
            (v for k, v in qtype.items() if k != "*" and k in name), qtype.get("*", "F32"))
        if arr.ndim == 2 and kind != "F32":
            import gguf_blocks

            q = gguf.GGMLQuantizationType[kind]
            blocks = gguf_blocks.quantize(arr, kind) if kind.endswith("_K") else gguf.quants.quantize(arr, q)
            w.add_tensor(name, blocks, raw_dtype=q)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", t["model.embed_tokens.weight"])
    add("output_norm.weight", t["model.norm.weight"])
    if "lm_head.weight" in t and not cfg.get("tie_word_embeddings", False):
        add("output.weight", t["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, g_name in _GGUF_LAYER_NAMES.items():
            arr = t[f"model.layers.{i}.{hf_name}"]
            if arch == "llama" and g_name.startswith("attn_q."):
                arr = permute_qk(arr, nh)
            if arch == "llama" and g_name.startswith("attn_k."):
                arr = permute_qk(arr, nkv)
            add(f"blk.{i}.{g_name}", arr)
    for name, (arr, raw_dtype) in (extra_tensors or {}).items():
        w.add_tensor(name, arr, raw_shape=None, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


class FakeRunner:
    """Samples token (position * 7) % 50 for every row that needs one; checks the batch contract.

    The token depends only on the sequence length it extends (`token`), so it is what a greedy model
    would give: with a speculative draft, each verified position gets the token of its own length."""

    num_in_flight = 0

    def __init__(self, engine) -> None:  # noqa: ANN001 - an LLMEngine
        self.engine = engine

    def token(self, num_tokens: int) -> int:
        """The token that follows a sequence of `num_tokens` tokens."""
        return (num_tokens * 7) % 50

    def step(self, scheduler):
        so = scheduler.schedule()
        return so, self.execute(so) if not so.is_empty else RunnerOutput()

    def execute(self, so):
        out = RunnerOutput()
        cfg = self.engine.scheduler.config
        assert 0 <= so.total_num_tokens <= cfg.max_num_batched_tokens
        assert so.scheduled or so.blocks_to_swap_out  # a step does something
        # a block swapped out and one swapped in are whole requests' tables: each lands in its own host
        # block (a device block may be read twice: two victims sharing a cached prefix block each take a copy)
        assert len({h for _, h in so.blocks_to_swap_out}) == len(so.blocks_to_swap_out)
        assert len(so.scheduled) <= cfg.max_num_seqs
        ids = [s.request.request_id for s in so.scheduled]
        assert len(ids) == len(set(ids))
        for s in so.scheduled:
            r = s.request
            end = r.num_computed_tokens + s.num_new_tokens
            spec = s.spec_token_ids
            assert s.num_new_tokens > 0 and end <= r.num_tokens + len(spec)
            assert not spec or (s.samples and end == r.num_tokens + len(spec))  # a draft follows the last token
            assert len(s.block_ids) * self.engine.kv.block_size >= end  # room for every token written
            if s.samples:
                out.sampled[r.request_id] = [self.token(r.num_tokens + j) for j in range(1 + len(spec))]
        return out


CTX = 512


def long_english_text() -> str:
    """Several thousand words of English prose from the Python reference manual (ships with CPython)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in ("assignment", "class", "exceptions", "execmodel", "function", "naming"))
    return text + "\n"


def ppl_text() -> str:
    """The perplexity tests' text: about 2,200 tokens, four 512-token chunks (1,020 scored tokens), enough
    to compare two implementations or formats (six chunks moved no comparison but cost ~30 s of the suite)."""
    return long_english_text()[:9_500]


def split_text() -> tuple[str, str]:
    """Disjoint calibration and held-out halves of long_english_text (cut at a line break)."""
    text = long_english_text()
    cut = text.index("\n", len(text) // 2)
    return text[:cut], text[cut:]


def layer_stats(lm, text: str, n_tokens: int, num_layers: int | None = None) -> list[dict]:
    """Each decoder layer's linears' input statistics (quant.calibrate) on the float model, unchanged."""
    from kvserve.quant.calibrate import calibration_chunks, run_layers

    out = []
    run_layers(lm, calibration_chunks(lm, text, n_tokens, 256), lambda i, layer, s: out.append(s), "stats", num_layers)
    return out

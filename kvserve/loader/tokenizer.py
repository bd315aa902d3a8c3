"""Tokenizer: a `tokenizers.Tokenizer` built from GGUF metadata or loaded from tokenizer.json,
plus special ids and the chat template."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from kvserve.errors import ModelLoadError, UnsupportedModelError
from kvserve.loader.chat_template import render_chat_template

logger = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer kinds (`tokenizer.ggml.pre`), as split regexes applied in order
# before byte-level BPE. Each one fixes which ids the model was trained with.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS: dict[str, list[str]] = {
    "gpt2": [_GPT2_SPLIT],
    "gpt-2": [_GPT2_SPLIT],
    "olmo": [_GPT2_SPLIT],
    # digits one by one, then the GPT-2 split
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "refact": [r"\p{N}", _GPT2_SPLIT],
    "codeshell": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT],
    "falcon3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
}

# GGUF token types
_CONTROL, _USER_DEFINED = 3, 4


def _bpe_pre_tokenizer(pre: str, source: object) -> pre_tokenizers.PreTokenizer:
    if pre not in _PRE_SPLITS:
        raise UnsupportedModelError(
            source, f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_PRE_SPLITS))})"
        )
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False) for rx in _PRE_SPLITS[pre]
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


class Tokenizer:
    """Text <-> ids, special ids and chat template of one model."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos: bool,
        chat_template: str | None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))  # ordered, unique
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render messages with the model's template (as transformers does); ids without an extra BOS."""
        if not self.chat_template:
            raise ModelLoadError("chat_template", "this model has no chat template")
        text = render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gf: Any) -> "Tokenizer":
        """Build from `tokenizer.ggml.*` metadata of a GGUF file (a `GGUFFile`)."""
        kind = gf.get("tokenizer.ggml.model")
        if kind is None:
            raise ModelLoadError(gf.path, "GGUF has no tokenizer (tokenizer.ggml.model missing)")
        if kind != "gpt2":
            raise UnsupportedModelError(
                gf.path, f"GGUF tokenizer model {kind!r} is not supported yet (byte-level BPE 'gpt2' is)"
            )
        tokens: list[str] = gf.get("tokenizer.ggml.tokens")
        types: list[int] = gf.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in gf.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False)
        tk = HFTokenizer(bpe)
        pre = gf.get("tokenizer.ggml.pre")
        if pre is None:
            logger.warning("%s: no tokenizer.ggml.pre; assuming the GPT-2 split", gf.path)
            pre = "gpt2"
        tk.pre_tokenizer = _bpe_pre_tokenizer(str(pre), gf.path)
        tk.decoder = decoders.ByteLevel()
        added = [
            AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
            for i in range(len(tokens))
            if types[i] in (_CONTROL, _USER_DEFINED)
        ]
        if added:
            tk.add_tokens(added)
        bos = gf.get("tokenizer.ggml.bos_token_id")
        eos_ids = [gf.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        eos_ids = [int(e) for e in eos_ids if e is not None]
        special = {}
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
            tid = gf.get(f"tokenizer.ggml.{key}_token_id")
            if tid is not None and 0 <= int(tid) < len(tokens):
                special[name] = tokens[int(tid)]
        return cls(
            tk,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            add_bos=bool(gf.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=gf.get("tokenizer.chat_template"),
            special_tokens=special,
        )

    @classmethod
    def from_hf_dir(cls, path: Path, config: dict[str, Any]) -> "Tokenizer":
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise ModelLoadError(path, "no tokenizer.json (only the fast-tokenizer format is supported)")
        tk = HFTokenizer.from_file(str(tok_file))
        tcfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            tcfg = json.loads((path / "tokenizer_config.json").read_text())
        gen: dict[str, Any] = {}
        if (path / "generation_config.json").exists():
            gen = json.loads((path / "generation_config.json").read_text())
        template = tcfg.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_str(v: Any) -> str | None:
            return v.get("content") if isinstance(v, dict) else v

        special = {k: s for k in ("bos_token", "eos_token", "unk_token", "pad_token") if (s := token_str(tcfg.get(k)))}
        bos_id = gen.get("bos_token_id", config.get("bos_token_id"))
        if bos_id is None and "bos_token" in special:
            bos_id = tk.token_to_id(special["bos_token"])
        eos: list[int] = []
        for src in (gen.get("eos_token_id"), config.get("eos_token_id")):
            if isinstance(src, int):
                eos.append(src)
            elif isinstance(src, list):
                eos.extend(int(e) for e in src)
        if "eos_token" in special and (eid := tk.token_to_id(special["eos_token"])) is not None:
            eos.append(eid)
        # tokenizer.json's post-processor decides about BOS; encode() adds it itself (one code path).
        add_bos = bool(tcfg.get("add_bos_token", False))
        if tk.post_processor is not None and bos_id is not None:
            probe = tk.encode("a", add_special_tokens=True).ids
            add_bos = add_bos or (len(probe) > 0 and probe[0] == bos_id)
        return cls(
            tk,
            bos_token_id=bos_id,
            eos_token_ids=eos,
            add_bos=add_bos,
            chat_template=template,
            special_tokens=special,
        )

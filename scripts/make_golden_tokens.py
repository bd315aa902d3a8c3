"""Regenerate tests/data/golden_tokens_smollm2.json with llama.cpp's own tokenizer.

Run once, in a separate venv with llama-cpp-python installed (not a kvserve dependency):
    python scripts/make_golden_tokens.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import json
import sys
from pathlib import Path

from llama_cpp import Llama

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    " leading space and trailing space ",
    "Numbers: 0 7 42 123 2024 3.14159 1,000,000 -17 0x1F 1e-9",
    "Phone +1 (555) 123-4567, date 2026-11-27, time 13:45:09",
    "whitespace   runs\t\ttabs\n\nnewlines\n   indented\r\nwindows line",
    "    four leading spaces",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "x = {'a': [1, 2, 3], \"b\": None}  # comment",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷 🇯🇵 and ZWJ 👨‍👩‍👧",
    "Ünïcödé àccents: café, naïve, façade, Straße",
    "中文文本：你好，世界！机器学习很有趣。",
    "日本語のテキストです。カタカナとひらがな。",
    "Русский текст: привет, мир!",
    "العربية: مرحبا بالعالم",
    "हिन्दी: नमस्ते दुनिया",
    "한국어: 안녕하세요 세계",
    "Ελληνικά: Γειά σου Κόσμε",
    "Mixed: GPT-2's tokenizer isn't 'perfect', you'll see; we're sure they'd agree.",
    "URLs https://example.com/path?q=1&r=two#frag and emails a.b@c.org",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Special-ish but not special: <|im_start and im_end|> <repo_name>",
    "a" * 50 + " " + "ab" * 20,
    "!!!??? ... --- *** ### @@@ $$$ %%% ^^^ &&& (((",
    "Tab\tseparated\tvalues\t123\t456",
    "   ",
    "\n",
    "x",
]


def main() -> None:
    llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
    cases = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=True)} for t in TEXTS]
    out = Path(__file__).resolve().parent.parent / "tests" / "data" / "golden_tokens_smollm2.json"
    meta = {"source": "llama.cpp via llama-cpp-python", "model": Path(sys.argv[1]).name}
    out.write_text(json.dumps({"meta": meta, "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()

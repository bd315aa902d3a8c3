"""The `kvserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kvserve.errors import KVServeError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="kvserve: LLM inference and serving")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="greedy continuation of a prompt")
    _add_model_args(g)
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")

    ev = sub.add_parser("eval", help="evaluations")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = ev_sub.add_parser("ppl", help="perplexity, computed as llama.cpp's llama-perplexity does")
    _add_model_args(ppl)
    ppl.add_argument("--file", required=True, help="text file")
    ppl.add_argument("--ctx", type=int, default=512)
    return parser


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvserve.errors import InvalidRequestError
    from kvserve.executor.reference import greedy_generate
    from kvserve.loader import load_model

    if args.max_tokens < 1:
        raise InvalidRequestError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    lm = load_model(args.model, dtype=args.dtype)
    print(lm.describe(), file=sys.stderr)
    tok = lm.tokenizer
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    out = greedy_generate(lm.model, [ids], args.max_tokens, stop_ids=set(tok.eos_token_ids))[0]
    if out and out[-1] in tok.eos_token_ids:
        out = out[:-1]
    print((args.prompt if not args.chat else "") + tok.decode(out))
    return 0


def _cmd_ppl(args: argparse.Namespace) -> int:
    from kvserve.errors import InvalidRequestError
    from kvserve.eval.perplexity import perplexity
    from kvserve.loader import load_model

    path = Path(args.file)
    if not path.is_file():
        raise InvalidRequestError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{path}: not UTF-8 text") from None
    lm = load_model(args.model, dtype=args.dtype)
    print(lm.describe(), file=sys.stderr)
    r = perplexity(lm, text, ctx=args.ctx)
    print(f"chunks {r.num_chunks} x ctx {r.ctx}, scored tokens {r.num_scored}")
    print(f"PPL = {r.ppl:.4f} +/- {r.stderr:.5f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "eval" and args.eval_command == "ppl":
            return _cmd_ppl(args)
    except KVServeError as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())

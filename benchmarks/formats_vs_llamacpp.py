"""Perplexity and size of each GGUF format kvserve runs natively, against llama.cpp on the same file.

The default model (Q4_1) is requantized by llama.cpp's own quantizer (llama_model_quantize through
llama-cpp-python, `--allow-requantize`: the Q4_1 file is the only source shipped) into Q4_K_M,
Q5_K_M, Q6_K and Q8_0 files, cached under --out-dir (never in the repo). For every file, both
engines score the same token ids the way llama.cpp's `llama-perplexity` does (chunks of --ctx
tokens, the first one BOS, the second half of each chunk scored), and the relative difference
of their perplexities is printed: the target is within 1% for every format. kvserve runs with no
flags (quantization auto -> gguf: each layer in the file's own format); the row also says which
kernel each layer's format took.

    python benchmarks/formats_vs_llamacpp.py                  # 5 formats, ctx 512, 12 chunks
    python benchmarks/formats_vs_llamacpp.py --formats Q8_0 --chunks 4
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import math
import os
import time
from pathlib import Path

FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K", "F32": "LLAMA_FTYPE_ALL_F32"}


def english_text() -> str:
    """Several thousand words of English prose from the Python reference manual (ships with CPython)."""
    from pydoc_data.topics import topics

    keys = ("assignment", "class", "exceptions", "execmodel", "function", "naming", "numbers", "types")
    return "\n\n".join(topics[k] for k in keys if k in topics)


def make_format(src: Path, fmt: str, out_dir: Path, threads: int) -> Path:
    import llama_cpp as lc

    if fmt == "Q4_1" and "Q4_1" in src.name:
        return src
    out = out_dir / f"{src.stem.rsplit('.', 1)[0]}.{fmt}.gguf"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        params = lc.llama_model_quantize_default_params()
        params.ftype = getattr(lc, FTYPES[fmt])
        params.allow_requantize = True
        params.nthread = threads
        tmp = out.with_suffix(".part")
        if lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {fmt}")
        tmp.rename(out)
    return out


def chunks_of(tokens: list[int], ctx: int, n: int, bos: int | None) -> list[list[int]]:
    out = []
    for c in range(min(n, len(tokens) // ctx)):
        chunk = tokens[c * ctx : (c + 1) * ctx]
        out.append([bos, *chunk[1:]] if bos is not None else chunk)
    return out


def summary(nll: list[float]) -> tuple[float, float]:
    mean = sum(nll) / len(nll)
    var = sum(x * x for x in nll) / len(nll) - mean * mean
    ppl = math.exp(mean)
    return ppl, math.sqrt(max(var, 0.0) / (len(nll) - 1)) * ppl


def kvserve_nll(path: Path, chunks: list[list[int]], ctx: int) -> tuple[list[float], str, float]:
    from kvserve.eval.perplexity import chunk_nlls
    from kvserve.loader import load_model

    lm = load_model(str(path), quantization="auto")  # what the engine does with no flags
    kinds = collections.Counter()
    for m in lm.model.model.layers.modules():
        q = getattr(m, "qweight", None)
        if q is not None:
            kinds[f"{type(q).__name__}{getattr(q, 'bits', '')}"] += 1
    t0 = time.perf_counter()
    nll = chunk_nlls(lm, [t for ch in chunks for t in ch], ctx).tolist()  # cut back into the same chunks
    return nll, ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())), time.perf_counter() - t0


def _quiet(level, text, user_data):  # noqa: ANN001 - llama.cpp's log callback
    return None


def _log_callback():
    import llama_cpp as lc

    return lc.llama_log_callback(_quiet)


_QUIET = None


def llamacpp_nll(path: Path, chunks: list[list[int]], ctx: int, threads: int) -> tuple[list[float], float]:
    import llama_cpp as lc
    import numpy as np

    global _QUIET
    _QUIET = _QUIET or _log_callback()  # kept alive: llama.cpp holds the pointer
    lc.llama_log_set(_QUIET, ctypes.c_void_p())
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = ctx, ctx, ctx
    cp.n_threads = cp.n_threads_batch = threads
    cctx = lc.llama_init_from_model(model, cp)
    vocab = lc.llama_n_vocab(lc.llama_model_get_vocab(model))
    mem = lc.llama_get_memory(cctx)
    batch = lc.llama_batch_init(ctx, 0, 1)
    first, out = ctx // 2, []
    t0 = time.perf_counter()
    for chunk in chunks:
        lc.llama_memory_clear(mem, True)
        batch.n_tokens = ctx
        for i, tok in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = first <= i < ctx - 1
        if lc.llama_decode(cctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        n_out = ctx - 1 - first
        ptr = lc.llama_get_logits(cctx)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_out, vocab))
        logits = logits.astype(np.float64)
        mx = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - mx).sum(axis=1)) + mx[:, 0]
        targets = np.array(chunk[first + 1 :])
        out.extend((lse - logits[np.arange(n_out), targets]).tolist())
    lc.llama_batch_free(batch)
    lc.llama_free(cctx)
    lc.llama_model_free(model)
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="source GGUF (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--formats", nargs="*", default=["Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"], choices=list(FTYPES))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(Path.home() / ".cache" / "kvserve" / "bench-formats"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from kvserve.eval.perplexity import prepare_text
    from kvserve.kernels import cpu as native
    from kvserve.loader import default_model_path, load_model

    src = Path(args.model) if args.model else default_model_path()
    tok = load_model(str(src), quantization="none").tokenizer
    tokens = tok.encode(prepare_text(english_text()), add_special_tokens=True)
    chunks = chunks_of(tokens, args.ctx, args.chunks, tok.bos_token_id if tok.add_bos else None)
    print(f"CPU kernels: {native.isa()}; {len(chunks)} chunks of {args.ctx} tokens, "
          f"{len(chunks) * (args.ctx - 1 - args.ctx // 2)} scored; {args.threads} threads")
    rows = []
    for fmt in args.formats:
        path = make_format(src, fmt, Path(args.out_dir), args.threads)
        ours, kinds, t_ours = kvserve_nll(path, chunks, args.ctx)
        theirs, t_theirs = llamacpp_nll(path, chunks, args.ctx, args.threads)
        (pk, ek), (pl, el) = summary(ours), summary(theirs)
        row = {"format": fmt, "file_mib": path.stat().st_size / 2**20, "kvserve_ppl": pk, "kvserve_err": ek,
               "llamacpp_ppl": pl, "llamacpp_err": el, "rel_diff": pk / pl - 1, "kvserve_layers": kinds,
               "kvserve_s": t_ours, "llamacpp_s": t_theirs}
        rows.append(row)
        print(f"{fmt:7s} {row['file_mib']:6.1f} MiB  kvserve {pk:8.3f} ± {ek:.3f}  llama.cpp {pl:8.3f} ± {el:.3f}  "
              f"diff {row['rel_diff']:+.2%}  ({t_ours:.0f} s vs {t_theirs:.0f} s; kvserve layers: {kinds})", flush=True)
    print(json.dumps({"kernels": native.isa(), "ctx": args.ctx, "rows": rows}))


if __name__ == "__main__":
    main()

"""Size, held-out perplexity and speed of each compressed variant of a model (`kvserve quantize`
and `kvserve prune`'s code paths), against the float reference.

The reference is the source model's float32 weights: for the default model, the float32
dequantization of its Q4_1 file (the only form it ships in). Calibration text: tests/helpers.py's
long_english_text (the Python reference manual's assignment, class, exceptions, execmodel, function
and naming sections, shipped with CPython in pydoc_data.topics); held-out text: the manual's
"specialnames" section (data model special method names), which shares no 200-character passage
with the calibration text (checked at start). Perplexity is computed as llama.cpp's
llama-perplexity does (chunks of --ctx tokens, the first BOS, the second half scored) with the
weights dequantized to float32 (the file's weight error alone), and for the quantized variants
also on the native path (the engine's default: int8 activations), and, where llama-cpp-python is
installed, by llama.cpp on the same file and tokens. Speed on the native path: decode tok/s at
batch 1 (64 new tokens after a 32-token prompt, less the time of the first) and total tok/s at
batch 16 (16 prompts of 32 tokens, 32 new each), on the engine's default path for the file (the
"ref" row: the source file itself, e.g. Q4_1; dense F16 pruned files: int8 requantized linears,
as the engine does for non-native types). Files are cached in --out-dir.

The 3- and 2-bit variants are GGUF Q3_K / Q2_K where a linear's input is whole 256-input
super-blocks (SmolLM2: down_proj, 1536 inputs) and a 32-group fallback format elsewhere (its other
linears have 576 inputs): Q4_0, as llama.cpp's own quantizer falls back ("-q3_k", "-q2_k"), or
Q8_0, which is close to lossless, so the row shows what the 3- or 2-bit down_proj alone costs
("-q3_k+q8_0"). Each row gives the bits per weight of the decoder layers' tensors as stored.

    python benchmarks/compress.py                         # all variants
    python benchmarks/compress.py --variants ref rtn-q4_0 gptq-q4_0 --plot /tmp/plots
    python benchmarks/compress.py --variants ref rtn-q3_k gptq-q3_k awq-q3_k rtn-q2_k gptq-q2_k
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

# name -> (kind, method, format, sparsity or pattern / a K-quant's fallback format)
VARIANTS = {
    "ref": ("ref", None, None, None),
    "rtn-q8_0": ("quantize", "rtn", "q8_0", None),
    "rtn-q4_0": ("quantize", "rtn", "q4_0", None),
    "gptq-q4_0": ("quantize", "gptq", "q4_0", None),
    "awq-q4_0": ("quantize", "awq", "q4_0", None),
    # K-quants: down_proj (1536 inputs) in Q3_K / Q2_K, the linears of 576 inputs in the fallback:
    # Q4_0 as llama.cpp's quantizer does (the practical file), Q8_0 (~lossless) to see the 3- or
    # 2-bit down_proj alone
    "rtn-q3_k": ("quantize", "rtn", "q3_k", "q4_0"),
    "gptq-q3_k": ("quantize", "gptq", "q3_k", "q4_0"),
    "awq-q3_k": ("quantize", "awq", "q3_k", "q4_0"),
    "rtn-q2_k": ("quantize", "rtn", "q2_k", "q4_0"),
    "gptq-q2_k": ("quantize", "gptq", "q2_k", "q4_0"),
    "rtn-q3_k+q8_0": ("quantize", "rtn", "q3_k", "q8_0"),
    "gptq-q3_k+q8_0": ("quantize", "gptq", "q3_k", "q8_0"),
    "awq-q3_k+q8_0": ("quantize", "awq", "q3_k", "q8_0"),
    "rtn-q2_k+q8_0": ("quantize", "rtn", "q2_k", "q8_0"),
    "gptq-q2_k+q8_0": ("quantize", "gptq", "q2_k", "q8_0"),
    # llama.cpp's own quantizer on the same float32 weights (it lays SmolLM2 out as "-q3_k" does)
    "llamacpp-q3_k_s": ("llamacpp", None, "Q3_K_S", None),
    # every linear on Q3_K's / Q2_K's arithmetic with super-blocks of 192 inputs (576 = 3 x 192,
    # 1536 = 8 x 192), measured in memory: no GGUF layout holds it, so no file, native or llama.cpp run
    "rtn-q3_k192-all": ("memory", "rtn", "q3_k", 192),
    "gptq-q3_k192-all": ("memory", "gptq", "q3_k", 192),
    "awq-q3_k192-all": ("memory", "awq", "q3_k", 192),
    "rtn-q2_k192-all": ("memory", "rtn", "q2_k", 192),
    "gptq-q2_k192-all": ("memory", "gptq", "q2_k", 192),
    "magnitude-50%": ("prune", "magnitude", "f16", 0.5),
    "wanda-50%": ("prune", "wanda", "f16", 0.5),
    "magnitude-2:4": ("prune", "magnitude", "f16", "2:4"),
    "wanda-2:4": ("prune", "wanda", "f16", "2:4"),
    "sparsegpt-2:4": ("prune", "sparsegpt", "f16", "2:4"),
}


def texts() -> tuple[str, str]:
    from pydoc_data.topics import topics

    from helpers import long_english_text

    calib, held = long_english_text(), topics["specialnames"]
    shared = [i for i in range(0, len(held) - 200, 50) if held[i : i + 200] in calib]
    if shared:
        raise SystemExit(f"held-out text shares {len(shared)} passages with the calibration text")
    return calib, held


def build(name: str, src: Path, out_dir: Path, calib: str, calib_tokens: int) -> tuple[Path, float]:
    """The variant's GGUF (cached) and the seconds it took to make (0 when cached)."""
    from kvserve.loader import load_model
    from kvserve.loader.gguf import GGUFFile
    from kvserve.quant.calibrate import calibration_chunks
    from kvserve.quant.compress import prune_model, quantize_model, write_gguf
    from kvserve.quant.grid import grid_for
    from kvserve.quant.prune import parse_pattern

    kind, method, fmt, how = VARIANTS[name]
    if kind == "ref":
        return src, 0.0
    if kind == "llamacpp":
        from formats_vs_llamacpp import make_format

        t0 = time.perf_counter()
        return make_format(src, fmt, out_dir, 1), time.perf_counter() - t0
    out = out_dir / f"{src.stem}.{name.replace(':', '_').replace('%', '').replace('+', '_')}.{calib_tokens}.gguf"
    if out.exists():
        return out, 0.0
    t0 = time.perf_counter()
    lm = load_model(src, quantization="none")
    needs = method not in ("rtn", "magnitude")
    chunks = calibration_chunks(lm, calib, calib_tokens) if needs else None
    if kind == "quantize":
        comp = quantize_model(lm, method, grid_for(fmt), chunks, fallback=grid_for(how) if how else None)
    else:
        pattern = parse_pattern(how) if isinstance(how, str) else None
        comp = prune_model(lm, method, chunks, None if pattern else how, pattern)
        comp.dense_type = fmt.upper()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_gguf(GGUFFile(src), lm, comp, out)
    return out, time.perf_counter() - t0


def memory_variant(name: str, src: Path, calib: str, calib_tokens: int, chunks: list[list[int]],
                   ctx: int) -> tuple[list[float], float, float]:
    """A "memory" variant: (held-out NLLs of the model quantized in memory, bits per weight of its
    linears in that arithmetic, seconds to quantize)."""
    from kvserve.eval.perplexity import chunk_nlls
    from kvserve.loader import load_model
    from kvserve.quant.calibrate import calibration_chunks
    from kvserve.quant.compress import quantize_model
    from kvserve.quant.kquant import SUB, KGrid

    _, method, fmt, super_block = VARIANTS[name]
    t0 = time.perf_counter()
    lm = load_model(src, quantization="none")
    grid = KGrid(fmt.upper(), super_block=super_block)
    cal = calibration_chunks(lm, calib, calib_tokens) if method != "rtn" else None
    quantize_model(lm, method, grid, cal)
    made = time.perf_counter() - t0
    # codes, then per sub-block 6 bits (Q3_K) or 4 + 4 (Q2_K), per super-block one or two fp16
    per_sub, per_super = (6, 16) if fmt == "q3_k" else (8, 32)
    bpw = grid.bits + per_sub / SUB + per_super / super_block
    return chunk_nlls(lm, [t for ch in chunks for t in ch], ctx).tolist(), bpw, made


def nll_of(path: Path, chunks: list[list[int]], ctx: int, quantization: str) -> tuple[list[float], str]:
    import collections

    from kvserve.eval.perplexity import chunk_nlls
    from kvserve.loader import load_model

    lm = load_model(str(path), quantization=quantization)
    kinds = collections.Counter(type(m.qweight).__name__ for m in lm.model.model.layers.modules()
                                if getattr(m, "qweight", None) is not None)
    nll = chunk_nlls(lm, [t for ch in chunks for t in ch], ctx).tolist()
    return nll, ",".join(f"{k}x{v}" for k, v in sorted(kinds.items())) or "float"


def linear_bits(path: Path) -> tuple[float, str]:
    """Bits per weight of the decoder layers' 2-D tensors as stored, and their types ("Q3_K x30, Q4_0 x180")."""
    import collections

    from gguf.constants import GGML_QUANT_SIZES

    from kvserve.loader.gguf import GGUFFile

    f = GGUFFile(path)
    bits = n = 0
    kinds = collections.Counter()
    for t in f.reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            block, size = GGML_QUANT_SIZES[t.tensor_type]
            bits += int(t.n_elements) // block * size * 8
            n += int(t.n_elements)
            kinds[t.tensor_type.name] += 1
    return bits / max(n, 1), ", ".join(f"{k} x{v}" for k, v in kinds.most_common())


def speed(path: Path) -> dict:
    from kvserve import LLM, SamplingParams

    llm = LLM(str(path), max_model_len=256, max_num_seqs=16)
    vocab = llm.engine.lm.config.vocab_size
    prompt = [(100 + i) % vocab for i in range(32)]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up

    def run(prompts: list[list[int]], n: int) -> float:
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    t1, t64 = run([prompt], 1), run([prompt], 64)
    batch = [[(200 + 40 * i + j) % vocab for j in range(32)] for i in range(16)]
    tb = run(batch, 32)
    res = {"decode_tok_s_b1": round(63 / (t64 - t1), 1), "total_tok_s_b16": round(16 * (32 + 32) / tb, 1),
           "quantization": llm.engine.lm.quantization}
    llm.shutdown()
    return res


def llamacpp_ppl(path: Path, chunks: list[list[int]], ctx: int, threads: int) -> float | None:
    """llama.cpp's perplexity of the file on the same tokens, in a child process (a file llama.cpp
    cannot load may abort the process rather than raise); None if it failed."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"path": str(path), "chunks": chunks, "ctx": ctx, "threads": threads}, f)
    try:
        r = subprocess.run([sys.executable, __file__, "--llamacpp-child", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode != 0 or not r.stdout.strip():
        print(f"llama.cpp could not score {path.name} (exit {r.returncode}): {r.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(r.stdout.strip().splitlines()[-1])


def _llamacpp_child(spec: str) -> None:
    from formats_vs_llamacpp import llamacpp_nll, summary

    a = json.loads(Path(spec).read_text())
    print(summary(llamacpp_nll(Path(a["path"]), a["chunks"], a["ctx"], a["threads"])[0])[0])


def plot(rows: list[dict], out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["file_mib"] is None:  # measured in memory: no file
            continue
        sp = r.get("decode_tok_s_b1") or 0
        ax.scatter(r["file_mib"], r["ppl"], s=20 + sp, alpha=0.7)
        ax.annotate(r["variant"], (r["file_mib"], r["ppl"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("file size (MiB)")
    ax.set_yscale("log")  # pruned variants are orders of magnitude apart
    ax.set_ylabel("held-out perplexity (ctx 512, log scale)")
    ax.set_title("size vs perplexity (marker area ~ decode tok/s at batch 1)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "compress_size_vs_ppl.png"
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="source GGUF (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8, help="held-out chunks of --ctx tokens scored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's perplexity of the quantized files")
    p.add_argument("--out-dir", default=str(Path.home() / ".cache" / "kvserve" / "bench-compress"))
    p.add_argument("--plot", default=None, help="directory for the size-vs-perplexity PNG")
    p.add_argument("--llamacpp-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llamacpp_child:
        return _llamacpp_child(args.llamacpp_child)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from formats_vs_llamacpp import chunks_of, summary

    from kvserve.eval.perplexity import prepare_text
    from kvserve.kernels import cpu as native
    from kvserve.loader import default_model_path, load_model

    src = Path(args.model) if args.model else default_model_path()
    calib, held = texts()
    tok = load_model(str(src), quantization="none").tokenizer
    tokens = tok.encode(prepare_text(held), add_special_tokens=True)
    chunks = chunks_of(tokens, args.ctx, args.chunks, tok.bos_token_id if tok.add_bos else None)
    try:
        import llama_cpp  # noqa: F401
        have_llamacpp = not args.no_llamacpp
    except ImportError:
        have_llamacpp = False
    print(f"{src.name}; reference: its float32 weights (dequantized where the file is quantized); "
          f"calibration {args.calib_tokens} tokens; held-out {len(chunks)} x {args.ctx} tokens; "
          f"{args.threads} thread(s); CPU kernels {native.isa()}", flush=True)
    print(f"{'variant':15s} {'MiB':>7s} {'bpw':>6s} {'ppl':>8s} {'±':>6s} {'Δppl':>7s} {'native':>8s} {'llama.cpp':>9s} "
          f"{'dec b1':>7s} {'tot b16':>8s}  make s / kernels", flush=True)
    rows, ref_ppl = [], None
    for name in args.variants:
        if VARIANTS[name][0] == "memory":
            nll, bpw, made = memory_variant(name, src, calib, args.calib_tokens, chunks, args.ctx)
            ppl, err = summary(nll)
            row = {"variant": name, "file_mib": None, "ppl": round(ppl, 4), "ppl_err": round(err, 4),
                   "make_s": round(made, 1), "linear_bpw": round(bpw, 3), "linear_types": "in memory"}
            if ref_ppl is not None:
                row["ppl_increase"] = round(ppl - ref_ppl, 4)
            rows.append(row)
            print(f"{name:15s} {'-':>7s} {bpw:6.3f} {ppl:8.3f} {err:6.3f} {row.get('ppl_increase', 0):+7.3f}  "
                  f"(in memory: no GGUF layout) {made:.0f}", flush=True)
            continue
        path, made = build(name, src, Path(args.out_dir), calib, args.calib_tokens)
        nll, _ = nll_of(path, chunks, args.ctx, "none")
        ppl, err = summary(nll)
        if name == "ref":
            ref_ppl = ppl
        bpw, types = linear_bits(path)
        row = {"variant": name, "file_mib": round(path.stat().st_size / 2**20, 2), "ppl": round(ppl, 4),
               "ppl_err": round(err, 4), "make_s": round(made, 1), "linear_bpw": round(bpw, 3),
               "linear_types": types}
        kind, _, fmt, _ = VARIANTS[name]
        if kind in ("quantize", "llamacpp"):
            nn_, kinds = nll_of(path, chunks, args.ctx, "auto")
            row["ppl_native"], row["native_layers"] = round(summary(nn_)[0], 4), kinds
            if have_llamacpp and (lp := llamacpp_ppl(path, chunks, args.ctx, args.threads)) is not None:
                row["ppl_llamacpp"] = round(lp, 4)
                row["llamacpp_vs_native"] = round(row["ppl_native"] / lp - 1, 4)
        if ref_ppl is not None:
            row["ppl_increase"] = round(ppl - ref_ppl, 4)
        if not args.no_speed:
            row.update(speed(path))
        rows.append(row)
        print(f"{name:15s} {row['file_mib']:7.1f} {bpw:6.3f} {ppl:8.3f} {err:6.3f} {row.get('ppl_increase', 0):+7.3f} "
              f"{row.get('ppl_native', float('nan')):8.3f} {row.get('ppl_llamacpp', float('nan')):9.3f} "
              f"{row.get('decode_tok_s_b1', float('nan')):7.1f} {row.get('total_tok_s_b16', float('nan')):8.1f}  "
              f"{made:.0f} / {row.get('quantization', '')} {row.get('native_layers', '')}", flush=True)
    by = {r["variant"]: r for r in rows}
    summary_ = {}
    if "ref" in by and "rtn-q4_0" in by:
        rtn_inc = by["rtn-q4_0"]["ppl_increase"]
        for m in ("gptq-q4_0", "awq-q4_0"):
            if m in by and rtn_inc > 0:
                summary_[f"{m}_increase_vs_rtn"] = round(by[m]["ppl_increase"] / rtn_inc, 3)
        print("q4_0 perplexity increase over the reference, as a fraction of RTN's (target <= 0.5): "
              + ", ".join(f"{k.split('_')[0]} {v:.2f}" for k, v in summary_.items()), flush=True)
    if "ref" in by:  # the K-quants: each calibrated variant against RTN with the same formats
        for fmt in ("q3_k", "q2_k", "q3_k+q8_0", "q2_k+q8_0", "q3_k192-all", "q2_k192-all"):
            rtn = by.get(f"rtn-{fmt}")
            if rtn is None or rtn["ppl_increase"] <= 0:
                continue
            got = {m: by[f"{m}-{fmt}"] for m in ("gptq", "awq") if f"{m}-{fmt}" in by}
            for m, r in got.items():
                summary_[f"{m}-{fmt}_increase_vs_rtn"] = round(r["ppl_increase"] / rtn["ppl_increase"], 3)
                summary_[f"{m}-{fmt}_ppl_below_rtn"] = round(rtn["ppl"] - r["ppl"], 4)
            if got:
                print(f"{fmt}: perplexity below RTN's ({rtn['ppl']:.3f}): " + ", ".join(
                    f"{m} by {rtn['ppl'] - r['ppl']:.3f} (increase {r['ppl_increase'] / rtn['ppl_increase']:.2f} of RTN's)"
                    for m, r in got.items()), flush=True)
    if args.plot:
        plot(rows, Path(args.plot))
    print(json.dumps({"model": src.name, "reference": "float32 weights of the source", "ctx": args.ctx,
                      "chunks": len(chunks), "calib_tokens": args.calib_tokens, "threads": args.threads,
                      "kernels": native.isa(), "rows": rows, **summary_}))


if __name__ == "__main__":
    main()

"""`kvserve quantize` and `kvserve prune`: calibrated compression of a model, written as a GGUF
llama.cpp reads (and kvserve serves), or (quantize) as a Hugging Face directory in the GPTQ checkpoint
layout that kvserve and the GPTQ loaders of other engines read."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from kvserve.errors import InvalidRequestError, ModelLoadError


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="quantize a model (RTN, GPTQ, AWQ-style); write a GGUF or a GPTQ-layout "
                                        "safetensors directory")
    q.add_argument("model", nargs="?", default=None,
                   help="a GGUF file, or for a directory --out also a Hugging Face directory (default: the embedded "
                        "default model)")
    q.add_argument("--method", choices=("rtn", "gptq", "awq"), default="gptq")
    q.add_argument("--bits", type=int, default=None,
                   help="bits per weight: 8, 4, 3, 2 (default 4; GGUF 3: q3_k, 2: q2_k)")
    q.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale (GGUF: 32 for the *_0/*_1 formats, 16 for the K-quants; safetensors: any "
                        "divisor of every linear's inputs, default 32)")
    q.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric grid (4 bits: q4_0; --no-symmetric: q4_1)")
    q.add_argument("--format", default=None,
                   help="GGUF block format: q4_0, q4_1, q8_0, q3_k, q2_k (default from --bits)")
    q.add_argument("--fallback", default="q4_0",
                   help="q3_k / q2_k only: the format of linears whose rows are not whole 256-input super-blocks "
                        "(q4_0, as llama.cpp falls back; q4_1, q8_0)")
    q.add_argument("--calib-file", default=None, help="UTF-8 text to calibrate on (needed by gptq and awq)")
    q.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens, in chunks of 512")
    q.add_argument("--out", required=True,
                   help="output: a .gguf file, or a directory (a Hugging Face model directory, linears in the GPTQ layout)")
    q.add_argument("--out-format", choices=("gguf", "safetensors"), default=None,
                   help="default: gguf when --out ends in .gguf, else safetensors")


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model (magnitude, Wanda, SparseGPT), optionally then quantize; write a GGUF")
    p.add_argument("model", nargs="?", default=None, help="a GGUF file (default: the embedded default model)")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="wanda")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, default=None, help="fraction of each row's weights set to zero")
    how.add_argument("--pattern", default=None, help="N:M: keep N of every M consecutive inputs (e.g. 2:4)")
    p.add_argument("--format", default="f32",
                   help="how the pruned linears are stored: f32, f16 (dense) or q8_0, q4_0, q4_1 (quantized after pruning)")
    p.add_argument("--calib-file", default=None, help="UTF-8 text to calibrate on (needed by wanda and sparsegpt)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens, in chunks of 512")
    p.add_argument("--out", required=True, help="output .gguf")


_FORMAT_BITS = {"q8_0": (8, True), "q4_0": (4, True), "q4_1": (4, False), "q3_k": (3, True), "q2_k": (2, False)}


def check_bits(bits: int | None) -> None:
    from kvserve.quant.gptq_format import BITS

    if bits is not None and bits not in BITS:
        raise InvalidRequestError(f"--bits {bits}: choose from {', '.join(map(str, sorted(BITS, reverse=True)))}")


def resolve_format(bits: int | None, symmetric: bool | None, fmt: str | None, group_size: int | None) -> str:
    """The GGUF format the flags name, or InvalidRequestError saying why there is none."""
    from kvserve.quant.grid import FORMATS, K_FORMATS

    check_bits(bits)
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise InvalidRequestError(f"unknown --format {fmt!r} (built: {', '.join(FORMATS)})")
        fb, fsym = _FORMAT_BITS[fmt]
        if bits is not None and bits != fb:
            raise InvalidRequestError(f"--format {fmt} has {fb} bits, not --bits {bits}")
        if symmetric is not None and symmetric != fsym:
            raise InvalidRequestError(f"--format {fmt} is {'' if fsym else 'not '}symmetric")
    elif bits in (8, 3, 2):
        fmt = {8: "q8_0", 3: "q3_k", 2: "q2_k"}[bits]
        fsym = _FORMAT_BITS[fmt][1]
        if symmetric is not None and symmetric != fsym:
            raise InvalidRequestError(f"{bits}-bit output is GGUF {fmt}, which is {'' if fsym else 'not '}symmetric")
    else:
        fmt = "q4_1" if symmetric is False else "q4_0"
    group = 16 if fmt in K_FORMATS else 32
    if group_size not in (None, group):
        what = "sub-blocks of 16 inputs (in super-blocks of 256)" if group == 16 else "groups of 32 inputs"
        raise InvalidRequestError(f"GGUF {fmt} has {what}, not --group-size {group_size}")
    return fmt


# the GGUF formats whose grids the GPTQ layout (an fp16 scale and an integer zero per group) cannot hold
_NOT_GPTQ = {"q4_1": "a float minimum per group, not an integer zero point",
             "q3_k": "sub-block scales that are 6-bit multiples of a super-block's",
             "q2_k": "sub-block scales and minimums that are 4-bit multiples of a super-block's"}


def resolve_gptq(bits: int | None, symmetric: bool | None, fmt: str | None, group_size: int | None) -> tuple[int, bool, int]:
    """(bits, symmetric, group size) of a GPTQ-layout output, or InvalidRequestError saying why the flags
    name none. --format q4_0 / q8_0 name their grids (symmetric 4 / 8 bits, groups of 32 by default)."""
    from kvserve.quant.grid import FORMATS

    check_bits(bits)
    if fmt is not None:
        fmt = fmt.lower()
        if fmt in _NOT_GPTQ:
            raise InvalidRequestError(f"GGUF {fmt}'s grid has {_NOT_GPTQ[fmt]}: the GPTQ layout cannot hold it "
                                      "exactly; write a .gguf")
        if fmt not in FORMATS:
            raise InvalidRequestError(f"unknown --format {fmt!r} (built: {', '.join(FORMATS)})")
        fb = _FORMAT_BITS[fmt][0]
        if bits not in (None, fb) or symmetric is False:
            raise InvalidRequestError(f"--format {fmt} is symmetric {fb}-bit")
        bits, symmetric = fb, True
    group = 32 if group_size is None else group_size
    if group < 1:
        raise InvalidRequestError(f"--group-size must be a positive number of inputs, not {group}")
    return 4 if bits is None else bits, True if symmetric is None else symmetric, group


def output_kind(out: str, out_format: str | None) -> str:
    """gguf or safetensors: --out-format, else by --out's name."""
    is_gguf = Path(out).suffix == ".gguf"
    kind = out_format or ("gguf" if is_gguf else "safetensors")
    if kind == "safetensors" and is_gguf:
        raise InvalidRequestError(f"--out {out}: safetensors output is a model directory, not a .gguf file")
    return kind


def check_out_dir(out: str) -> Path:
    p = Path(out)
    if p.suffix == ".safetensors":
        raise InvalidRequestError(f"--out {out}: safetensors output is a model directory (config.json, tokenizer, "
                                  "model.safetensors): name the directory")
    if p.exists() and not p.is_dir():
        raise InvalidRequestError(f"--out {out}: exists and is not a directory")
    from kvserve.quant.export_hf import FILES

    if p.is_dir() and (others := sorted(f.name for f in p.iterdir() if f.name not in FILES)):
        # another model's shards or index beside ours would be read as part of this one
        raise InvalidRequestError(f"--out {out}: a directory holding other files ({', '.join(others[:3])}); "
                                  "name a new or empty one")
    if not p.parent.is_dir():
        raise InvalidRequestError(f"--out {out}: no such directory {p.parent}")
    return p


def resolve_fallback(fmt: str, fallback: str) -> str | None:
    """The format of the linears a K-quant does not fit (None for the other formats)."""
    from kvserve.quant.grid import FLAT_FORMATS, K_FORMATS

    if fmt not in K_FORMATS:
        return None
    fallback = fallback.lower()
    if fallback not in FLAT_FORMATS:
        raise InvalidRequestError(f"--fallback {fallback!r}: choose from {', '.join(FLAT_FORMATS)}")
    return fallback


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"{p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{p}: not UTF-8 text") from None


def open_source(model: str | None, hf_ok: bool = False):  # noqa: ANN201 - (GGUFFile or HFModelDir, path)
    """The source: a GGUF, or with `hf_ok` (a directory output, which needs no GGUF metadata) also a
    Hugging Face directory."""
    from kvserve.loader import default_model_path
    from kvserve.loader.gguf import GGUFFile
    from kvserve.loader.hf import HFModelDir

    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    if path.is_dir() and not hf_ok:
        raise ModelLoadError(path, "a Hugging Face directory: GGUF output is written from a GGUF source only "
                                   "(its metadata); a directory --out takes this source")
    return (HFModelDir(path) if path.is_dir() else GGUFFile(path)), path


def describe_source(src) -> str:  # noqa: ANN001 - a GGUFFile or an HFModelDir
    """The quantized weights of a source, in a few words."""
    if hasattr(src, "reader"):  # a GGUF: its 2-D tensors' types
        return "/".join(sorted({t.tensor_type.name for t in src.reader.tensors if len(t.shape) == 2})) + " weights"
    return f"{src.describe_quantization()} linears"


def check_out(out: str) -> Path:
    p = Path(out)
    if p.suffix != ".gguf":
        raise InvalidRequestError(f"--out {out}: GGUF output is a .gguf file")
    if not p.parent.is_dir():
        raise InvalidRequestError(f"--out {out}: no such directory {p.parent}")
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    from kvserve.loader import load_model
    from kvserve.quant.compress import quantize_model

    kind = output_kind(args.out, args.out_format)
    if kind == "gguf":
        fmt = resolve_format(args.bits, args.symmetric, args.format, args.group_size)
        fallback = resolve_fallback(fmt, args.fallback)
        out, gptq = check_out(args.out), None
    else:
        gptq = resolve_gptq(args.bits, args.symmetric, args.format, args.group_size)
        out = check_out_dir(args.out)
    if args.method != "rtn" and args.calib_file is None:
        raise InvalidRequestError(f"--method {args.method} needs --calib-file")
    if args.calib_file:
        read_text(args.calib_file)  # a bad file fails before the model loads
    src, path = open_source(args.model, hf_ok=kind == "safetensors")
    t0 = time.perf_counter()
    lm = load_model(path, dtype="float32", quantization="none")
    if src.has_quantized_weights():
        print(f"source {path.name}: {describe_source(src)} dequantized to float32; that float32 model is "
              "the reference", file=sys.stderr)
    if kind == "gguf":
        from kvserve.quant.grid import grid_for

        grid, fb_grid, label = grid_for(fmt), grid_for(fallback) if fallback else None, fmt.upper()
    else:
        from kvserve.quant.export_hf import check_gptq_shapes
        from kvserve.quant.grid import gptq_grid

        bits, sym, group = gptq
        try:
            check_gptq_shapes(lm, bits, group)  # before any calibration
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        grid, fb_grid = gptq_grid(bits, sym, group), None
        label = f"GPTQ {bits}-bit {'symmetric' if sym else 'asymmetric'}, groups of {group}"
    chunks = _calibration(args, lm, args.method != "rtn")
    try:
        comp = quantize_model(lm, args.method, grid, chunks, fallback=fb_grid)
    except ValueError as e:  # rows that are not whole groups of 32, a Hessian that cannot be factored
        raise InvalidRequestError(str(e)) from None
    size = _write(kind, src, lm, comp, out, args, gptq)
    errs = [r.rel_error for r in comp.reports if r.rel_error is not None]
    print(f"{args.method} -> {label}: {len(comp.parts)} linears, {comp.calib_tokens} calibration tokens, "
          f"{time.perf_counter() - t0:.1f}s")
    if fb_grid is not None:  # a K-quant: say which linears it fits and what the mix costs
        print(describe_mix(comp.type_counts(), fmt.upper()))
    if errs:
        worst = max(comp.reports, key=lambda r: r.rel_error or 0.0)
        print(f"relative output error ||dW X||^2/||W X||^2 on the calibration inputs: mean {statistics.mean(errs):.3g}, "
              f"worst {worst.rel_error:.3g} ({worst.name})")
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return 0


def _write(kind: str, src, lm, comp, out: Path, args: argparse.Namespace,  # noqa: ANN001
           gptq: tuple[int, bool, int] | None) -> int:
    """Write the output; its size in bytes."""
    if kind == "gguf":
        from kvserve.quant.compress import write_gguf

        write_gguf(src, lm, comp, out, {"kvserve.compress.method": args.method,
                                        "kvserve.compress.calib_tokens": comp.calib_tokens})
        return out.stat().st_size
    from kvserve.loader.hf import HFModelDir
    from kvserve.quant.export_hf import write_gptq_dir

    bits, sym, group = gptq
    try:
        written = write_gptq_dir(lm, comp, out, bits, group, sym,
                                 source=src.path if isinstance(src, HFModelDir) else None)
    except ValueError as e:  # a grid the layout cannot hold exactly
        raise InvalidRequestError(str(e)) from None
    return sum((out / f).stat().st_size for f in written)


def describe_mix(counts: dict[str, tuple[int, int]], main: str) -> str:
    """One line: each GGUF type's share of the linears' weights and the bits per weight they average."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    total = sum(n for _, n in counts.values())
    bits = 0.0
    parts = []
    for t, (c, n) in sorted(counts.items(), key=lambda kv: -kv[1][1]):
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
        bits += n / block * size * 8
        note = "" if t == main else " (rows not whole 256-input super-blocks)"
        parts.append(f"{t} {c} linears, {n / total:.1%} of the weights{note}")
    return f"linear layers: {'; '.join(parts)}: {bits / total:.3f} bits per weight"


def _calibration(args: argparse.Namespace, lm, needs: bool):  # noqa: ANN001, ANN202
    from kvserve.quant.calibrate import calibration_chunks

    if needs and args.calib_file is None:
        raise InvalidRequestError(f"--method {args.method} needs --calib-file")
    return calibration_chunks(lm, read_text(args.calib_file), args.calib_tokens) if args.calib_file else None


def cmd_prune(args: argparse.Namespace) -> int:
    from kvserve.loader import load_model
    from kvserve.quant.compress import prune_model, write_gguf
    from kvserve.quant.grid import FLAT_FORMATS, grid_for
    from kvserve.quant.prune import parse_pattern

    fmt = args.format.lower()
    if fmt not in ("f32", "f16", *FLAT_FORMATS):
        raise InvalidRequestError(f"unknown --format {args.format!r} (choose from f32, f16, {', '.join(FLAT_FORMATS)})")
    pattern = None
    if args.pattern is not None:
        try:
            pattern = parse_pattern(args.pattern)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise InvalidRequestError(f"--sparsity must be in [0, 1), not {args.sparsity}")
    out = check_out(args.out)
    if args.method != "magnitude" and args.calib_file is None:
        raise InvalidRequestError(f"--method {args.method} needs --calib-file")
    src, path = open_source(args.model)
    t0 = time.perf_counter()
    lm = load_model(path, dtype="float32", quantization="none")
    if src.has_quantized_weights():
        print(f"source {path.name}: quantized weights dequantized to float32; that float32 model is the reference",
              file=sys.stderr)
    chunks = _calibration(args, lm, args.method != "magnitude")
    grid = grid_for(fmt) if fmt in FLAT_FORMATS else None
    try:
        comp = prune_model(lm, args.method, chunks, args.sparsity, pattern, grid)
    except ValueError as e:  # a pattern that does not divide the rows
        raise InvalidRequestError(str(e)) from None
    if grid is None:
        comp.dense_type = fmt.upper()
    write_gguf(src, lm, comp, out, {"kvserve.compress.method": args.method,
                                    "kvserve.compress.sparsity": args.pattern or str(args.sparsity)})
    zeros = total = 0
    for layer in lm.model.model.layers:
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    errs = [r.rel_error for r in comp.reports if r.rel_error is not None]
    print(f"{args.method} {args.pattern or args.sparsity} -> {fmt.upper()}: {zeros / total:.4f} of the linears' "
          f"weights are zero, {comp.calib_tokens} calibration tokens, {time.perf_counter() - t0:.1f}s")
    if errs:
        print(f"relative output error on the calibration inputs: mean {statistics.mean(errs):.3g}, worst {max(errs):.3g}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0

"""`kvserve quantize` and `kvserve prune`: calibrated compression of a model, written as a GGUF
llama.cpp reads (and kvserve serves)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from kvserve.errors import InvalidRequestError, ModelLoadError


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="quantize a model (RTN, GPTQ, AWQ-style) and write a GGUF")
    q.add_argument("model", nargs="?", default=None, help="a GGUF file (default: the embedded default model)")
    q.add_argument("--method", choices=("rtn", "gptq", "awq"), default="gptq")
    q.add_argument("--bits", type=int, choices=(8, 4, 3, 2), default=None, help="bits per weight (default 4)")
    q.add_argument("--group-size", type=int, default=32, help="inputs per scale (the GGUF *_0/*_1 formats: 32)")
    q.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric grid (4 bits: q4_0; --no-symmetric: q4_1)")
    q.add_argument("--format", default=None, help="GGUF block format: q4_0, q4_1, q8_0 (default from --bits)")
    q.add_argument("--calib-file", default=None, help="UTF-8 text to calibrate on (needed by gptq and awq)")
    q.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens, in chunks of 512")
    q.add_argument("--out", required=True, help="output .gguf")


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


def resolve_format(bits: int | None, symmetric: bool | None, fmt: str | None, group_size: int) -> str:
    """The GGUF format the flags name, or InvalidRequestError saying why there is none."""
    from kvserve.quant.grid import FORMATS

    if bits in (2, 3):
        raise InvalidRequestError(f"{bits}-bit output (GGUF Q{bits}_K) is not built yet; choose --bits 4 or 8")
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise InvalidRequestError(f"unknown --format {fmt!r} (built: {', '.join(FORMATS)})")
        fb, fsym = {"q8_0": (8, True), "q4_0": (4, True), "q4_1": (4, False)}[fmt]
        if bits is not None and bits != fb:
            raise InvalidRequestError(f"--format {fmt} has {fb} bits, not --bits {bits}")
        if symmetric is not None and symmetric != fsym:
            raise InvalidRequestError(f"--format {fmt} is {'' if fsym else 'not '}symmetric")
    elif (bits or 4) == 8:
        if symmetric is False:
            raise InvalidRequestError("8-bit output is GGUF q8_0, which is symmetric")
        fmt = "q8_0"
    else:
        fmt = "q4_1" if symmetric is False else "q4_0"
    if group_size != 32:
        raise InvalidRequestError(f"GGUF {fmt} has groups of 32 inputs, not --group-size {group_size}")
    return fmt


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"{p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{p}: not UTF-8 text") from None


def open_source(model: str | None):  # noqa: ANN201 - (GGUFFile, path)
    """The source GGUF (an HF directory is refused until a GGUF metadata writer for it exists)."""
    from kvserve.loader import default_model_path
    from kvserve.loader.gguf import GGUFFile

    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    if path.is_dir():
        raise ModelLoadError(path, "a Hugging Face directory: compression writes GGUF from a GGUF source only so far")
    return GGUFFile(path), path


def check_out(out: str) -> Path:
    p = Path(out)
    if p.suffix != ".gguf":
        raise InvalidRequestError(f"--out {out}: only GGUF output (.gguf) is built")
    if not p.parent.is_dir():
        raise InvalidRequestError(f"--out {out}: no such directory {p.parent}")
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    from kvserve.loader import load_model
    from kvserve.quant.compress import quantize_model, write_gguf
    from kvserve.quant.grid import grid_for

    fmt = resolve_format(args.bits, args.symmetric, args.format, args.group_size)
    out = check_out(args.out)
    if args.method != "rtn" and args.calib_file is None:
        raise InvalidRequestError(f"--method {args.method} needs --calib-file")
    if args.calib_file:
        read_text(args.calib_file)  # a bad file fails before the model loads
    src, path = open_source(args.model)
    t0 = time.perf_counter()
    lm = load_model(path, dtype="float32", quantization="none")
    if src.has_quantized_weights():
        kinds = sorted({t.tensor_type.name for t in src.reader.tensors if len(t.shape) == 2})
        print(f"source {path.name}: {'/'.join(kinds)} weights dequantized to float32; that float32 model is "
              "the reference", file=sys.stderr)
    chunks = _calibration(args, lm, args.method != "rtn")
    try:
        comp = quantize_model(lm, args.method, grid_for(fmt), chunks)
    except ValueError as e:  # rows that are not whole groups of 32, a Hessian that cannot be factored
        raise InvalidRequestError(str(e)) from None
    write_gguf(src, lm, comp, out, {"kvserve.compress.method": args.method,
                                    "kvserve.compress.calib_tokens": comp.calib_tokens})
    errs = [r.rel_error for r in comp.reports if r.rel_error is not None]
    print(f"{args.method} -> {fmt.upper()}: {len(comp.parts)} linears, {comp.calib_tokens} calibration tokens, "
          f"{time.perf_counter() - t0:.1f}s")
    if errs:
        worst = max(comp.reports, key=lambda r: r.rel_error or 0.0)
        print(f"relative output error ||dW X||^2/||W X||^2 on the calibration inputs: mean {statistics.mean(errs):.3g}, "
              f"worst {worst.rel_error:.3g} ({worst.name})")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _calibration(args: argparse.Namespace, lm, needs: bool):  # noqa: ANN001, ANN202
    from kvserve.quant.calibrate import calibration_chunks

    if needs and args.calib_file is None:
        raise InvalidRequestError(f"--method {args.method} needs --calib-file")
    return calibration_chunks(lm, read_text(args.calib_file), args.calib_tokens) if args.calib_file else None


def cmd_prune(args: argparse.Namespace) -> int:
    from kvserve.loader import load_model
    from kvserve.quant.compress import prune_model, write_gguf
    from kvserve.quant.grid import FORMATS, grid_for
    from kvserve.quant.prune import parse_pattern

    fmt = args.format.lower()
    if fmt not in ("f32", "f16", *FORMATS):
        raise InvalidRequestError(f"unknown --format {args.format!r} (choose from f32, f16, {', '.join(FORMATS)})")
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
    grid = grid_for(fmt) if fmt in FORMATS else None
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

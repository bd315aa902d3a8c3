"""Every Triton kernel launch the engine can make, recorded from its wrappers and compiled for CUDA with no GPU.

The wrappers (the attention backend, the fused layers) run on small CPU tensors with
``JITFunction.run`` replaced by a recorder: each launch is bound by Triton's own binder for
the CUDA backend, so the signature, the divisibility attributes and the constexprs are the ones
a GPU would compile (the kernels themselves never run). Each distinct spec is then compiled by
``triton.compile`` for sm_80 and sm_90, and ptxas reports its registers and spills.

    python -m kvserve.kernels.triton.launches [--arch 80 90] [--json PATH]

Run it without TRITON_INTERPRET (the interpreter's wrappers choose interpreter-only constexprs);
tests/kernels/test_triton_compile.py runs it in a subprocess on every CI run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from unittest import mock

import torch

# The engine's shapes (attention: heads, KV heads, head_dim; MLP: hidden, intermediate).
SHAPES = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, theta=500000.0),
    "smollm2-135m": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, theta=100000.0),
}
# (shape, model dtype, --kv-cache-dtype): the combinations the engine serves on a GPU
CONFIGS = [
    ("llama3-8b", torch.bfloat16, "auto"),
    ("llama3-8b", torch.bfloat16, "int8"),
    ("llama3-8b", torch.bfloat16, "float16"),
    ("smollm2-135m", torch.bfloat16, "auto"),
    ("smollm2-135m", torch.bfloat16, "int8"),
    ("smollm2-135m", torch.bfloat16, "float16"),
    ("llama3-8b", torch.float32, "auto"),  # float32 with head_dim 128: the smallest extend tiles
    ("llama3-8b", torch.float32, "int8"),
    ("smollm2-135m", torch.float32, "auto"),
    ("smollm2-135m", torch.float32, "int8"),
    ("smollm2-135m", torch.float32, "bfloat16"),
    ("smollm2-135m", torch.float32, "float16"),
]
SPILL_BUDGET = 0  # bytes of spill stores per thread a launch may have
BLOCK_SIZE = 16  # the engine's default --block-size
MAX_SPLITS = 16  # TritonAttentionBackend's default max_splits


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    tags: set[str] = field(default_factory=set)


@contextlib.contextmanager
def recording(tag: str, out: list[Launch]):
    """Every kernel launch inside is appended to `out` (tagged) instead of run."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        out.append(Launch(self, args, dict(kwargs), {tag}))
        return None

    with mock.patch.object(JITFunction, "run", run), \
            mock.patch("kvserve.layers.norm.fused_enabled", lambda x: True), \
            mock.patch("kvserve.layers.activation.fused_enabled", lambda x: True), \
            mock.patch("kvserve.layers.rotary.fused_enabled", lambda x: True):
        yield


def _kv_cache(num_blocks: int, shape: dict, model_dtype: torch.dtype, kv: str):
    from kvserve.layers.attention import KVCache
    from kvserve.layers.attention.kv_cache import resolve_kv_dtype

    dims = (num_blocks, BLOCK_SIZE, shape["kv_heads"], shape["head_dim"])
    dtype = resolve_kv_dtype(kv, model_dtype)
    if dtype == torch.int8:
        scales = dims[:3]
        return KVCache(torch.zeros(dims, dtype=torch.int8), torch.zeros(dims, dtype=torch.int8),
                       torch.ones(scales), torch.ones(scales))
    return KVCache(torch.zeros(dims, dtype=dtype), torch.zeros(dims, dtype=dtype))


def _meta(query_lens: list[int], seq_lens: list[int], width: int):
    from kvserve.layers.attention import AttentionMetadata

    qsl, slots, tables, block = [0], [], [], 0
    for q, s in zip(query_lens, seq_lens):
        qsl.append(qsl[-1] + q)
        nb = -(-s // BLOCK_SIZE)
        table = list(range(block, block + nb))
        block += nb
        tables.append(table + [0] * (width - nb))
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(s - q, s)]
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64), block_tables=torch.tensor(tables, dtype=torch.int32),
    ), block


# batches the scheduler makes: decodes only, prefills of each extend tile size, chunks over a prefix, mixed
BATCHES = [
    ([1, 1, 1], [40, 300, 17]),
    ([5], [5]),
    ([20, 1], [20, 64]),
    ([40], [90]),
    ([100, 1, 7], [100, 2000, 7]),
    ([300], [300]),
]


def record_config(shape_name: str, dtype: torch.dtype, kv: str) -> list[Launch]:
    """The launches of one model shape, dtype and KV cache dtype, through the engine's own wrappers."""
    from kvserve.kernels.triton.backend import TritonAttentionBackend
    from kvserve.layers.activation import SiluAndMul
    from kvserve.layers.norm import RMSNorm
    from kvserve.layers.rotary import RotaryEmbedding

    s = SHAPES[shape_name]
    tag = f"{shape_name}/{str(dtype).removeprefix('torch.')}/kv={kv}"
    out: list[Launch] = []
    width = max(-(-n // BLOCK_SIZE) for _, sl in BATCHES for n in sl)
    with torch.no_grad(), recording(tag, out):
        norm = RMSNorm(s["hidden"]).to(dtype)
        act = SiluAndMul()
        rope = RotaryEmbedding(s["head_dim"], s["head_dim"], 4096, s["theta"])
        backend = TritonAttentionBackend(max_splits=MAX_SPLITS)
        for query_lens, seq_lens in BATCHES:
            T = sum(query_lens)
            x = torch.zeros(T, s["hidden"], dtype=dtype)
            norm(x)
            norm(x, x)
            act(torch.zeros(T, 2 * s["intermediate"], dtype=dtype))
            positions = torch.arange(T, dtype=torch.int64)
            q = torch.zeros(T, s["heads"], s["head_dim"], dtype=dtype)
            k = torch.zeros(T, s["kv_heads"], s["head_dim"], dtype=dtype)
            q, k = rope(positions, q, k)
            meta, blocks = _meta(query_lens, seq_lens, width)
            cache = _kv_cache(blocks + 1, s, dtype, kv)
            plan = backend.prepare(meta)
            backend.forward(q, k, k.clone(), cache, meta, plan, s["head_dim"] ** -0.5)
        # every split count the backend can choose on a GPU (it depends on the SM count and the batch)
        meta, blocks = _meta([1, 1], [4000, 33], width=-(-4000 // BLOCK_SIZE))
        cache = _kv_cache(blocks + 1, s, dtype, kv)
        q = torch.zeros(2, s["heads"], s["head_dim"], dtype=dtype)
        k = torch.zeros(2, s["kv_heads"], s["head_dim"], dtype=dtype)
        for n in range(1, MAX_SPLITS + 1):
            plan = backend.prepare(meta)
            plan.num_splits = n
            backend.forward(q, k, k, cache, meta, plan, 0.1)
    return out


@dataclass
class Spec:
    name: str
    signature: dict
    constexprs: dict  # name -> value
    attrs: dict
    options: dict
    kernel: object
    tags: set[str]

    def key(self) -> str:
        return json.dumps([self.name, self.signature, {k: repr(v) for k, v in self.constexprs.items()},
                           {repr(k): v for k, v in self.attrs.items()}, self.options], sort_keys=True, default=repr)

    def label(self) -> str:
        shown = {k: v for k, v in self.constexprs.items() if k != "DOT_F32"}
        ptrs = ",".join(v.lstrip("*") for k, v in self.signature.items() if k.endswith("_ptr") and v != "constexpr")
        return f"{self.name}[{ptrs}] " + " ".join(f"{k}={v}" for k, v in shown.items())


def _pack_args(fn, backend, kwargs: dict, bound: dict, specialization: list):
    """JITFunction._pack_args of Triton 3.9; Triton 3.6 does the same inline in JITFunction.run."""
    if hasattr(fn, "_pack_args"):
        return fn._pack_args(backend, kwargs, bound, specialization, None)
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in specialization]
    signature = {p.name: v for p, v in zip(fn.params, sigvals)}
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound.values()), path) for path in constexprs}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return options, signature, constexprs, attrs


def bind(launch: Launch, target) -> Spec:
    """What the JIT would hand triton.compile for this launch on `target` (Triton's own binder)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = _pack_args(fn, backend, launch.kwargs, bound, specialization)
    names = list(signature)
    named = {names[path[0]]: value for path, value in constexprs.items()}
    opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    return Spec(fn.__name__, signature, named, attrs, opts, fn, set(launch.tags))


def _ptxas(capability: int) -> str:
    """Triton's own ptxas (3.9: get_ptxas(capability); 3.6: get_ptxas()), else its bundled binary, else PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(capability).path
        except TypeError:
            return get_ptxas().path
    except Exception:  # noqa: BLE001 - any Triton version
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        return path if os.path.exists(path) else shutil.which("ptxas")


def ptxas_usage(ptx: str) -> dict:
    """Registers, spill bytes and stack frame per thread, as `ptxas -v` reports them."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas(int(re.sub(r"\D", "", arch))), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    return {"arch": arch, "registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def compile_spec(spec: Spec, target) -> dict:
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs), target=target,
                              options=spec.options or None)
    usage = ptxas_usage(compiled.asm["ptx"])
    return {"spec": spec.label(), "kernel": spec.name, "capability": target.arch, "tags": sorted(spec.tags),
            "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "seconds": round(time.perf_counter() - t0, 2), **usage}


def all_specs(target) -> list[Spec]:
    specs: dict[str, Spec] = {}
    for config in CONFIGS:
        for launch in record_config(*config):
            spec = bind(launch, target)
            if (old := specs.get(spec.key())) is not None:
                old.tags |= spec.tags
            else:
                specs[spec.key()] = spec
    return list(specs.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", help="write every spec's figures here")
    ap.add_argument("--spill-budget", type=int, default=SPILL_BUDGET)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the wrappers would choose the interpreter's constexprs", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget

    results, failures = [], []
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for spec in all_specs(target):
            try:
                r = compile_spec(spec, target)
            except Exception as e:  # noqa: BLE001 - report every failing spec, not the first
                failures.append(f"sm_{arch} {spec.label()}: {type(e).__name__}: {str(e).strip()[:400]}")
                continue
            results.append(r)
            over = r["spill_stores"] > args.spill_budget
            if over:
                failures.append(f"sm_{arch} {r['spec']}: {r['spill_stores']} bytes of spill stores "
                                f"(budget {args.spill_budget})")
            print(f"{r['arch']:7} regs {r['registers']:3} spill {r['spill_stores']:5}/{r['spill_loads']:<5} "
                  f"stack {r['stack']:5} smem {r['shared']:6} warps {r['num_warps']}  {r['spec']}"
                  + ("  OVER BUDGET" if over else ""), flush=True)
    import triton

    print(f"{len(results)} launch specs compiled with Triton {triton.__version__}; {len(failures)} failures")
    for f in failures:
        print("FAIL", f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": results, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

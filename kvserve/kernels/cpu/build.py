"""Compiling the kernels: which ISA variants this CPU runs, their compiler flags, the cached .so."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = ("runtime.c", "act_quant.c", "gemm_q8.c", "gemm_q4.c", "gemm_wide.c", "gemm_f32.c", "attn_decode.c", "attn_prefill.c", "llama_decode.c", "logits.c")
_HEADERS = ("simd.h", "common.h")
_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# ISA -> (compiler flags, /proc/cpuinfo flags the CPU must report), best first
_X86 = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"],
               ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")),
    # AVX2 with VPDPBUSD on 256-bit registers (Intel Alder Lake and later): simd.h's AVX2 layer
    "avxvnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], ("avx2", "fma", "f16c", "avx_vnni")),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c")),
}
ISAS = ("avx512", "avxvnni", "avx2", "neon", "scalar")
SIMD_ISAS = ("avx512", "avxvnni", "avx2", "neon")  # what the engine runs; scalar is the reference


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 "flags", ARM "Features") from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX-BF16, ARM BF16); without it torch's
    bf16 GEMMs run about 100x slower than float32 (measured on Zen 3)."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags())


_SOURCE_ISA = {"avxvnni": "avx2"}  # variants that are another ISA's source with more compiler flags

NEON_FLAGS = {True: ["-march=armv8.2-a+dotprod"], False: ["-march=armv8-a"]}  # with / without the dot product


def _isa_flags(isa: str) -> list[str] | None:
    """Compiler flags of a variant this CPU can run, or None when it cannot."""
    machine = platform.machine().lower()
    if isa == "scalar":
        return []
    if isa in _X86:
        flags, need = _X86[isa]
        return flags if machine in ("x86_64", "amd64") and set(need) <= _cpu_flags() else None
    if isa == "neon":
        return NEON_FLAGS["asimddp" in _cpu_flags()] if machine in ("aarch64", "arm64") else None
    raise ValueError(f"unknown ISA {isa!r} (one of {', '.join(ISAS)})")


def compile_command(cc: str, isa: str, flags: list[str]) -> list[str]:
    """The compiler invocation for the kernel sources of `isa` (without sources and output)."""
    return [cc, *_BASE_FLAGS, *flags, f"-DKV_ISA_{_SOURCE_ISA.get(isa, isa).upper()}"]


def _compile(cmd: list[str], sources: list[Path], out: Path, what: str) -> None:
    """`cmd` (compiler and flags) on each source into an object file, one compiler per core at once
    (largest source first), then the objects linked by `cmd` into `out`. One compiler on all sources
    took 13 s for the AVX2 kernels on 2 cores (attn_decode.c alone 3 s): a first start waits for
    the longest file, not the sum. Raises RuntimeError with the compiler's message."""
    workers = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = [Path(tmp) / f"{src.stem}.o" for src in sources]
        todo = sorted(zip(sources, objs), key=lambda so: -so[0].stat().st_size)
        running: list[tuple[Path, subprocess.Popen]] = []
        failed = None
        while (todo or running) and failed is None:
            while todo and len(running) < workers:
                src, obj = todo.pop(0)
                running.append((src, subprocess.Popen([*cmd, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True)))
            src, proc = running.pop(0)
            log, _ = proc.communicate()
            if proc.returncode != 0:
                failed = f"{src.name}: {log.strip()}"
        for _, proc in running:  # after a failure: stop the others
            proc.kill()
            proc.communicate()
        if failed is None:
            res = subprocess.run([*cmd, *map(str, objs), "-o", str(out), "-lm"], capture_output=True, text=True)
            if res.returncode != 0:
                failed = f"linking: {res.stderr.strip()}"
    if failed is not None:
        raise RuntimeError(f"compiling {what} failed:\n{failed}")


def build_check_driver(out: Path, isa: str, cc: str, flags: list[str]) -> None:
    """Compile check_kernels.c with the kernel sources into an executable (cross-ISA tests: any
    compiler and target, e.g. aarch64-linux-gnu-gcc for NEON under qemu-user; no OpenMP)."""
    cmd = [cc, "-O2", "-ffp-contract=off", "-static", *flags, f"-DKV_ISA_{_SOURCE_ISA.get(isa, isa).upper()}",
           f"-I{_DIR}"]
    sources = [_DIR / "check_kernels.c", *(_DIR / s for s in _SOURCES if s != "runtime.c")]
    _compile(cmd, sources, Path(out), f"the {isa} check driver")


def supported_isas() -> list[str]:
    """The variants this CPU runs, best first (scalar always last)."""
    return [isa for isa in ISAS if _isa_flags(isa) is not None]


def best_isa() -> str:
    return supported_isas()[0]


def _cache_dir() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve")


def build(isa: str | None = None, force: bool = False) -> Path:
    """Compile the kernels for `isa` (default: the best this CPU runs), if not cached; the .so's path."""
    isa = isa or best_isa()
    flags = _isa_flags(isa)
    if flags is None:
        raise RuntimeError(f"this CPU cannot run the {isa} kernels")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    # KVSERVE_CFLAGS: extra compiler flags, for tuning experiments (e.g. -DKV_Q4_MR=2 tile shapes)
    cmd = compile_command(cc, isa, [*flags, *os.environ.get("KVSERVE_CFLAGS", "").split()])
    digest = hashlib.sha256(" ".join(cmd).encode())
    for name in (*_HEADERS, *_SOURCES):
        digest.update((_DIR / name).read_bytes())
    out = _cache_dir() / f"kvserve_cpu_{isa}_{digest.hexdigest()[:16]}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        _compile(cmd, [_DIR / s for s in _SOURCES], tmp_so, f"the {isa} kernels")
        os.replace(tmp_so, out)  # atomic: concurrent builders never see half a file
    logger.info("built %s", out)
    return out

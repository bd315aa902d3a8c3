"""The machine's roofline: read bandwidth and GEMM peak, measured once per machine and cached.

A decode step reads every weight once: at small batch its speed is bandwidth / weight bytes (memory-IO
bound); a step's arithmetic intensity (FLOP per byte read) above the ridge point, peak / bandwidth, makes
it compute bound. `kvserve roofline` measures both peaks (a few seconds), caches them in
$KVSERVE_CACHE_DIR/roofline.json (default ~/.cache/kvserve), keyed by device, thread count and torch
version, and prints them; `line()` puts an achieved speed next to them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peaks:
    read_bandwidth_gb_s: float  # bytes read per second (a reduction over a buffer far larger than the caches) / 1e9
    gemm_gflop_s: float  # a square matmul's 2 n^3 / seconds / 1e9
    gemm_shape: str  # "n^3 dtype"
    device: str
    threads: int
    measured_at: float  # unix time

    @property
    def ridge_flop_per_byte(self) -> float:
        """Arithmetic intensity where the compute roof meets the memory roof."""
        return self.gemm_gflop_s / self.read_bandwidth_gb_s


def cache_path() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve") / "roofline.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model}"


def machine_key(device: torch.device) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{device_name(device)}|threads={threads}|torch={torch.__version__.split('+')[0]}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, repeats: int) -> float:  # noqa: ANN001 - a callable
    fn()  # warm-up: page faults, kernel selection
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_read_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """GB/s of a float32 sum over `nbytes` (best of `repeats`): every byte read once, almost nothing written."""
    x = torch.ones(max(nbytes // 4, 1024), dtype=torch.float32, device=device)
    t = _best(lambda: x.sum(), device, repeats)
    return x.numel() * 4 / t / 1e9


def measure_gemm(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul (best of `repeats`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _best(lambda: a @ b, device, repeats)
    return 2 * n**3 / t / 1e9


def default_sizes(device: torch.device) -> tuple[int, int, torch.dtype]:
    """(bytes to read, GEMM n, GEMM dtype): a buffer far past the last-level cache; the dtype decode runs in."""
    if device.type == "cuda":
        return 2**31, 8192, torch.bfloat16
    return 2**30, 2048, torch.float32


def measure(device: torch.device, nbytes: int | None = None, gemm_n: int | None = None) -> Peaks:
    d_bytes, d_n, dtype = default_sizes(device)
    nbytes, gemm_n = nbytes or d_bytes, gemm_n or d_n
    bw = measure_read_bandwidth(device, nbytes)
    flops = measure_gemm(device, gemm_n, dtype)
    return Peaks(bw, flops, f"{gemm_n}^3 {str(dtype).removeprefix('torch.')}", device_name(device),
                 torch.get_num_threads() if device.type == "cpu" else 0, time.time())


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring the unreadable roofline cache %s (%s)", path, e)
        return {}


def cached(device: torch.device) -> Peaks | None:
    """This machine's peaks from the cache, or None (nothing is measured)."""
    entry = _read_cache(cache_path()).get(machine_key(device))
    try:
        return Peaks(**entry) if isinstance(entry, dict) else None
    except TypeError:
        return None


def get(device: torch.device, remeasure: bool = False, nbytes: int | None = None,
        gemm_n: int | None = None) -> tuple[Peaks, bool]:
    """(peaks, True if they came from the cache); measures and caches them when absent or asked to."""
    if not remeasure:
        hit = cached(device)
        if hit is not None:
            return hit, True
    peaks = measure(device, nbytes, gemm_n)
    path = cache_path()
    data = _read_cache(path)
    data[machine_key(device)] = asdict(peaks)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as e:
        logger.warning("could not cache the roofline in %s (%s)", path, e)
    return peaks, False


def line(peaks: Peaks | None, bytes_per_s: float, flop_per_s: float | None = None) -> str:
    """One roofline line for an achieved speed: GB/s of weights read (and GFLOP/s) against the peaks."""
    if peaks is None:
        return f"roofline: {bytes_per_s / 1e9:.2f} GB/s of weights read (`kvserve roofline` measures the peaks)"
    share = 100 * bytes_per_s / 1e9 / peaks.read_bandwidth_gb_s
    out = f"roofline: {bytes_per_s / 1e9:.2f} GB/s of weights read = {share:.0f}% of the measured " \
          f"{peaks.read_bandwidth_gb_s:.1f} GB/s"
    if flop_per_s is not None:
        intensity = flop_per_s / bytes_per_s if bytes_per_s else 0.0
        out += f"; {flop_per_s / 1e9:.1f} GFLOP/s = {100 * flop_per_s / 1e9 / peaks.gemm_gflop_s:.0f}% of " \
               f"{peaks.gemm_gflop_s:.0f}; {intensity:.1f} FLOP/byte (ridge {peaks.ridge_flop_per_byte:.1f}: " \
               f"{'compute' if intensity > peaks.ridge_flop_per_byte else 'memory-IO'} bound)"
    return out

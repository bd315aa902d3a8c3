"""Step-time models: seconds for one engine step as a function of its batch.

A batch is summarised by `BatchFeatures` (tokens computed, sequences, sequences that sample,
context tokens whose K/V are read, query x context pairs of attention). Two models:

  LinearCostModel    a + b*tokens + c*seqs + d*sampled + e*context + f*pairs + g*mixed, fitted by
                     least squares (non-negative) to steps measured on this machine
                     (`kvserve simulate --calibrate`); mixed is 1 for a step holding both
                     one-token sequences and longer chunks (on a CPU with the fused decode step
                     those are two forwards);
  RooflineCostModel  overhead + max(bytes / bandwidth, flops / peak) for hardware we cannot
                     run here: weights and K/V are read once per step, 2 flops per parameter per
                     token plus attention.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvserve.config import EngineConfig
from kvserve.engine.scheduler import SchedulerOutput
from kvserve.errors import InvalidRequestError

FEATURES = ("const", "tokens", "seqs", "sampled", "context", "kpairs", "mixed")


@dataclass(frozen=True)
class BatchFeatures:
    tokens: int  # tokens computed this step (prefill chunks + decodes)
    seqs: int
    sampled: int  # sequences whose last logits give a token (lm head rows)
    context: int  # sum over sequences of context length after the step (K/V read)
    pairs: int  # sum over sequences of new tokens x context length (attention work)
    mixed: int = 0  # 1 if the step holds one-token sequences and longer chunks together

    def vector(self) -> list[float]:
        return [1.0, self.tokens, self.seqs, self.sampled, self.context, self.pairs / 1000.0, float(self.mixed)]


def batch_features(so: SchedulerOutput) -> BatchFeatures:
    """Features of a scheduled batch (from what it froze when scheduled: valid before and after the update)."""
    tokens = seqs = sampled = context = pairs = singles = 0
    for s in so.scheduled:
        singles += s.num_new_tokens == 1
        start = s.start
        end = start + s.num_new_tokens
        tokens += s.num_new_tokens
        seqs += 1
        sampled += int(s.samples)
        context += end
        pairs += s.num_new_tokens * (start + end + 1) // 2
    return BatchFeatures(tokens, seqs, sampled, context, pairs, int(0 < singles < seqs))


class CostModel:
    def step_time(self, f: BatchFeatures) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass
class LinearCostModel(CostModel):
    coef: dict[str, float]
    r2: float = float("nan")
    mean_abs_rel_error: float = float("nan")
    num_samples: int = 0
    source: str = ""

    def step_time(self, f: BatchFeatures) -> float:
        return float(sum(self.coef.get(k, 0.0) * v for k, v in zip(FEATURES, f.vector())))

    def scaled(self, factor: float) -> "LinearCostModel":
        """The same model on a machine `factor` times slower (every step time multiplied)."""
        return LinearCostModel({k: v * factor for k, v in self.coef.items()}, self.r2, self.mean_abs_rel_error,
                               self.num_samples, f"{self.source} x {factor:.3f}")

    def describe(self) -> str:
        terms = ", ".join(f"{k}={v:.3g}" for k, v in self.coef.items() if v)
        return (f"linear step-time model ({self.num_samples} measured steps, R^2 {self.r2:.3f}, "
                f"mean |error| {100 * self.mean_abs_rel_error:.1f}%): {terms}")

    @classmethod
    def fit(cls, samples: list[tuple[BatchFeatures, float]], source: str = "") -> "LinearCostModel":
        """Least squares with non-negative coefficients (features that fit negative are dropped, the rest refitted).

        Absolute, not relative, error: the simulator's job is the sum of step times, and a mean
        fit keeps the slow steps (another process took the CPU) in the expectation.
        """
        if len(samples) < len(FEATURES):
            raise InvalidRequestError(f"need at least {len(FEATURES)} measured steps to fit, got {len(samples)}")
        X = np.array([f.vector() for f, _ in samples])
        y = np.array([t for _, t in samples])
        active = list(range(len(FEATURES)))
        while True:
            w, *_ = np.linalg.lstsq(X[:, active], y, rcond=None)
            neg = [a for a, v in zip(active, w) if v < 0]
            if not neg or len(active) == 1:
                break
            active.remove(min(neg, key=lambda a: w[active.index(a)]))
        coef = {k: 0.0 for k in FEATURES}
        for a, v in zip(active, w):
            coef[FEATURES[a]] = float(max(v, 0.0))
        pred = X @ np.array([coef[k] for k in FEATURES])
        ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
        r2 = 1 - float(((y - pred) ** 2).sum()) / ss_tot
        mare = float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-9)))
        return cls(coef, r2, mare, len(samples), source)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"kind": "linear", **asdict(self)}, indent=1))


@dataclass
class RooflineCostModel(CostModel):
    """Weights and K/V streamed once per step; compute at 2 flops per parameter per token."""

    params: float  # parameters
    bytes_per_param: float
    kv_bytes_per_token: float
    num_layers: int
    q_size: int  # num_heads * head_dim
    bandwidth: float  # bytes/s
    flops: float  # flop/s
    overhead_s: float = 0.002  # scheduling, launch and sampling per step
    efficiency: float = 0.7  # achieved share of peak bandwidth and flops
    name: str = field(default="roofline")

    def step_time(self, f: BatchFeatures) -> float:
        bytes_moved = self.params * self.bytes_per_param + self.kv_bytes_per_token * f.context
        flop = 2 * self.params * f.tokens + 4 * self.num_layers * self.q_size * f.pairs
        return self.overhead_s + max(bytes_moved / self.bandwidth, flop / self.flops) / self.efficiency

    def describe(self) -> str:
        return (f"{self.name}: {self.params / 1e9:.2f}B params x {self.bytes_per_param} B, "
                f"{self.kv_bytes_per_token / 1024:.0f} KiB KV/token, {self.bandwidth / 1e12:.2f} TB/s, "
                f"{self.flops / 1e12:.0f} TFLOP/s, efficiency {self.efficiency}")


# peak dense bf16 figures from the vendors' data sheets; memory in bytes
HARDWARE = {
    "h100": dict(bandwidth=3.35e12, flops=989e12, memory=80e9),
    "h200": dict(bandwidth=4.8e12, flops=989e12, memory=141e9),
    "a100": dict(bandwidth=2.0e12, flops=312e12, memory=80e9),
    "l4": dict(bandwidth=0.3e12, flops=121e12, memory=24e9),
}
# Llama-style shapes: params, layers, kv heads, head dim, heads
MODELS = {
    "smollm2-135m": dict(params=135e6, num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9),
    "llama-8b": dict(params=8.0e9, num_layers=32, num_kv_heads=8, head_dim=128, num_heads=32),
    "llama-70b": dict(params=70.6e9, num_layers=80, num_kv_heads=8, head_dim=128, num_heads=64),
}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """K and V bytes one token takes over all layers, as the engine's cache holds them (int8: values plus scales)."""
    from kvserve.layers.attention import KVCache

    return num_layers * KVCache.bytes_per_token(num_kv_heads, head_dim, kv_dtype)


def model_kv_bytes_per_token(cfg: EngineConfig) -> int:
    """KV bytes per token of the engine `cfg` describes: cfg.model's shape (the default model when
    None), read from the file's metadata without loading weights, at cfg.kv_cache_dtype ("auto": cfg.dtype)."""
    from kvserve.layers.attention import resolve_kv_dtype
    from kvserve.loader import model_source

    cfg = cfg.resolve()  # dtype "auto" made concrete
    m = model_source(cfg.model).model_config()
    kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, getattr(torch, cfg.dtype))
    return kv_bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, kv_dtype)


def model_shape(model: str | None) -> dict:
    """A MODELS-style shape (params, layers, heads) of a model file or directory (None: the default model),
    from its metadata: the parameters are counted from the tensor headers, no weights are loaded."""
    from kvserve.loader import model_source

    src = model_source(model)
    m = src.model_config()
    return dict(params=float(src.num_params()), num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
                head_dim=m.head_dim, num_heads=m.num_heads, name=Path(src.path).name)


def roofline(hardware: str, model: str | dict, bytes_per_param: float = 2.0, kv_dtype: torch.dtype = torch.bfloat16,
             tensor_parallel: int = 1) -> tuple[RooflineCostModel, float]:
    """A roofline model of `model` (a MODELS name, or a shape from model_shape()) on `hardware` (tensor_parallel
    GPUs), its K/V cached in `kv_dtype` (default: the 2-byte dtype of the weights); returns it and the KV bytes
    available."""
    if hardware not in HARDWARE:
        raise InvalidRequestError(f"hardware must be one of {', '.join(HARDWARE)}, got {hardware!r}")
    if isinstance(model, str) and model not in MODELS:
        raise InvalidRequestError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if tensor_parallel < 1:
        raise InvalidRequestError("tensor_parallel must be >= 1")
    h = HARDWARE[hardware]
    m, label = (MODELS[model], model) if isinstance(model, str) else (model, model.get("name", "model"))
    kv_per_token = kv_bytes_per_token(m["num_layers"], m["num_kv_heads"], m["head_dim"], kv_dtype)
    cm = RooflineCostModel(
        params=m["params"], bytes_per_param=bytes_per_param, kv_bytes_per_token=kv_per_token,
        num_layers=m["num_layers"], q_size=m["num_heads"] * m["head_dim"],
        bandwidth=h["bandwidth"] * tensor_parallel, flops=h["flops"] * tensor_parallel,
        name=f"roofline {label} on {tensor_parallel}x {hardware}",
    )
    kv_bytes = 0.9 * h["memory"] * tensor_parallel - m["params"] * bytes_per_param
    if kv_bytes <= 0:
        raise InvalidRequestError(f"{label} does not fit on {tensor_parallel}x {hardware}")
    return cm, kv_bytes


def load_cost_model(path: str | Path) -> LinearCostModel:
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"{p}: no cost model; run `kvserve simulate --calibrate` first")
    try:
        d = json.loads(p.read_text())
        d.pop("kind")
        return LinearCostModel(**d)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidRequestError(f"{p}: not a kvserve cost model ({e})") from None


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]

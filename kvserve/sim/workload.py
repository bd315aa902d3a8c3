"""Workloads for the simulator: JSONL files or a seeded synthetic generator.

One JSON object per line: {"arrival": seconds, "output_len": tokens, and either "prompt_len"
or "prompt_token_ids", optionally "priority", "max_tokens", "request_id"}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvserve.errors import InvalidRequestError


@dataclass
class WorkItem:
    arrival: float
    output_len: int  # tokens the request produces before it stops (EOS in the real run)
    prompt_len: int = 0
    prompt_ids: list[int] | None = field(default=None, repr=False)
    priority: int = 0
    max_tokens: int = 512
    request_id: str | None = None
    kind: str = ""  # free-form class label ("short", "long"); a synthetic prompt's first tokens encode it

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids) if self.prompt_ids is not None else self.prompt_len

    def prompt_token_ids(self, index: int) -> list[int]:
        """The real prompt ids, or deterministic stand-ins: a class marker then ids unique to this item."""
        if self.prompt_ids is not None:
            return list(self.prompt_ids)
        marker = [1000 + (sum(map(ord, self.kind)) * 7 + j) % 500 for j in range(min(8, self.prompt_len))]
        rng = np.random.default_rng(index)
        return marker + rng.integers(2000, 30000, size=self.prompt_len - len(marker)).tolist()


def load_jsonl(path: str | Path) -> list[WorkItem]:
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"{p}: no such workload file")
    items = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            item = WorkItem(arrival=float(d["arrival"]), output_len=int(d["output_len"]),
                            prompt_len=int(d.get("prompt_len", 0)), prompt_ids=d.get("prompt_token_ids"),
                            priority=int(d.get("priority", 0)), max_tokens=int(d.get("max_tokens", 512)),
                            request_id=d.get("request_id"), kind=str(d.get("kind", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidRequestError(f"{p}:{n}: bad workload line ({e!r})") from None
        if item.num_prompt_tokens < 1 or item.output_len < 1 or item.arrival < 0 or item.max_tokens < 1:
            raise InvalidRequestError(f"{p}:{n}: needs a prompt, output_len >= 1, max_tokens >= 1 and arrival >= 0")
        items.append(item)
    if not items:
        raise InvalidRequestError(f"{p}: empty workload")
    return items


def save_jsonl(items: list[WorkItem], path: str | Path) -> None:
    with open(path, "w") as f:
        for w in items:
            d = {k: v for k, v in asdict(w).items() if k != "prompt_ids" and v not in (None, "")}
            if w.prompt_ids is not None:
                d["prompt_token_ids"] = w.prompt_ids
                d.pop("prompt_len", None)
            f.write(json.dumps(d) + "\n")


def synthetic(num_requests: int, rate: float, seed: int = 0, short_frac: float = 0.7,
              short_len: tuple[int, int] = (1, 16), long_len: tuple[int, int] = (128, 512),
              prompt_len: tuple[int, int] = (32, 256), max_tokens: int = 512,
              high_priority_frac: float = 0.0) -> list[WorkItem]:
    """Poisson arrivals at `rate` req/s; a mix of short answers and long (log-uniform) ones."""
    if num_requests < 1 or rate <= 0:
        raise InvalidRequestError("num_requests must be >= 1 and rate > 0")
    if not 0 <= short_frac <= 1 or not 0 <= high_priority_frac <= 1:
        raise InvalidRequestError("short_frac and high_priority_frac must be in [0, 1]")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
    items = []
    for i in range(num_requests):
        short = rng.random() < short_frac
        lo, hi = short_len if short else long_len
        out = int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))) if not short else int(rng.integers(lo, hi + 1))
        items.append(WorkItem(
            arrival=float(arrivals[i]), output_len=max(1, min(out, max_tokens)),
            prompt_len=int(rng.integers(prompt_len[0], prompt_len[1] + 1)),
            priority=0 if rng.random() < high_priority_frac else 1, max_tokens=max_tokens,
            request_id=f"syn-{i}", kind="short" if short else "long"))
    return items


def scale_rate(items: list[WorkItem], factor: float) -> list[WorkItem]:
    """The same requests arriving `factor` times faster (a traffic peak)."""
    if factor <= 0:
        raise InvalidRequestError("rate scale must be > 0")
    return [WorkItem(**{**asdict(w), "arrival": w.arrival / factor}) for w in items]

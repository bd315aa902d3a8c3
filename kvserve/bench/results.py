"""Summaries shared by the `kvserve bench` sub-commands: percentiles, goodput SLOs, the printed table."""

from __future__ import annotations

import math
from typing import Any

from kvserve.errors import InvalidRequestError

GOODPUT_METRICS = ("ttft", "tpot", "e2el")  # vLLM's names: time to first token, per output token, end to end


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(name: str, seconds: list[float], percentiles: tuple[float, ...] = (99,)) -> dict[str, float]:
    """mean_/median_/std_/pXX_<name>_ms of a list of durations in seconds (vLLM's result keys)."""
    v = sorted(x * 1000 for x in seconds)
    out = {f"mean_{name}_ms": sum(v) / len(v) if v else math.nan, f"median_{name}_ms": quantile(v, 0.5)}
    if v:
        mean = out[f"mean_{name}_ms"]
        out[f"std_{name}_ms"] = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
    else:
        out[f"std_{name}_ms"] = math.nan
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = quantile(v, p / 100)
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds); one-line errors."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise InvalidRequestError(f"--goodput takes NAME:MILLISECONDS with NAME one of "
                                      f"{', '.join(GOODPUT_METRICS)}; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise InvalidRequestError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise InvalidRequestError(f"--goodput {item!r}: the limit must be > 0 ms")
        slos[name] = ms
    return slos


def meets(slos: dict[str, float], ttft: float, tpot: float | None, e2el: float) -> bool:
    """Whether one request (times in seconds) met every SLO (in milliseconds)."""
    got = {"ttft": ttft * 1000, "tpot": None if tpot is None else tpot * 1000, "e2el": e2el * 1000}
    return all(got[k] is None or got[k] <= limit for k, limit in slos.items())


def print_table(title: str, rows: list[tuple[str, Any]], width: int = 50) -> None:
    """vLLM's result block: a title line, `label: value` rows, a closing rule."""
    print(f"{' ' + title + ' ':=^{width}}")
    for label, value in rows:
        if value is None:
            print(f"{'-' * ((width - len(label) - 2) // 2)} {label} {'-' * ((width - len(label) - 1) // 2)}")
        elif isinstance(value, float):
            print(f"{label + ':':<40}{value:<10.2f}")
        else:
            print(f"{label + ':':<40}{value:<10}")
    print("=" * width)


def latency_rows(result: dict[str, float], names: tuple[tuple[str, str], ...],
                 percentiles: tuple[float, ...] = (99,)) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, header in names:
        rows.append((header, None))
        rows.append((f"Mean {key.upper()} (ms)", result[f"mean_{key}_ms"]))
        rows.append((f"Median {key.upper()} (ms)", result[f"median_{key}_ms"]))
        for p in percentiles:
            rows.append((f"P{p:g} {key.upper()} (ms)", result[f"p{p:g}_{key}_ms"]))
    return rows

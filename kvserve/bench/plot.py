"""PNG plots of a bench run (matplotlib, imported only for --plot)."""

from __future__ import annotations

from pathlib import Path

from kvserve.errors import InvalidRequestError


def _plt():  # noqa: ANN202 - matplotlib.pyplot
    try:
        import matplotlib
    except ImportError:
        raise InvalidRequestError("--plot needs matplotlib (pip install matplotlib, or kvserve[bench-serve])"
                                  ) from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def cdf(path: Path, series: dict[str, list[float]], xlabel: str, title: str) -> Path | None:
    """An empirical CDF per series (values in seconds, drawn in ms); None when every series is empty."""
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, v in series.items():
        ax.step([x * 1000 for x in v], [(i + 1) / len(v) for i in range(len(v))], where="post", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(series):  # named series (a sweep): a legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def kv_timeline(path: Path, steps: list[dict], t0: float, title: str) -> Path | None:
    """KV-cache usage and running / waiting requests over the run, from /stats step records."""
    if not steps:
        return None
    plt = _plt()
    t = [s["time"] - t0 for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(t, [100 * s["kv_cache_usage_perc"] for s in steps], color="tab:blue", label="KV cache usage %")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("KV cache usage (%)")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(t, [s["running"] for s in steps], color="tab:orange", lw=1, label="running")
    ax2.plot(t, [s["waiting"] for s in steps], color="tab:green", lw=1, label="waiting")
    ax2.set_ylabel("requests")
    ax2.set_ylim(bottom=0)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
              frameon=False)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep(path: Path, runs: list[dict]) -> Path:
    """Output throughput and median / p99 end-to-end latency against --max-concurrency."""
    plt = _plt()
    conc = [r["max_concurrency"] for r in runs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    a1.plot(conc, [r["output_throughput"] for r in runs], marker="o")
    a1.set_xlabel("max concurrency")
    a1.set_ylabel("output tokens / s")
    a1.set_title("Throughput")
    a2.plot(conc, [r["median_e2el_ms"] for r in runs], marker="o", label="median e2e")
    p99 = next((k for k in runs[0] if k.startswith("p") and k.endswith("_e2el_ms")), None)
    if p99:
        a2.plot(conc, [r[p99] for r in runs], marker="o", label=p99.split("_")[0] + " e2e")
    a2.plot(conc, [r["median_ttft_ms"] for r in runs], marker="o", label="median TTFT")
    a2.set_xlabel("max concurrency")
    a2.set_ylabel("ms")
    a2.set_title("Latency")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(conc, [str(c) for c in conc])
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check_available(plot_dir: str | None) -> Path | None:
    """Fail before the run, not after it, when --plot cannot be honoured."""
    if plot_dir is None:
        return None
    _plt()
    d = Path(plot_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d

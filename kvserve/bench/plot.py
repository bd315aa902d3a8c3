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
    if len(series) > 1 or next(iter(series)):
        ax.legend()
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


def check_available(plot_dir: str | None) -> Path | None:
    """Fail before the run, not after it, when --plot cannot be honoured."""
    if plot_dir is None:
        return None
    _plt()
    d = Path(plot_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d

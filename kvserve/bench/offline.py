"""`kvserve bench throughput` and `kvserve bench latency`: the offline `LLM`, vLLM's flag names.

throughput: --num-prompts requests of --input-len random tokens (or --dataset-path prompts) submitted at
once; requests/s, total and output tokens/s. latency: one batch of --batch-size requests, timed end to
end over --num-iters iterations after --num-iters-warmup; mean and percentiles.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

from kvserve.bench import plot
from kvserve.bench.results import quantile, summarize_ms
from kvserve.errors import InvalidRequestError


def add_parsers(sub: argparse._SubParsersAction, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    t = sub.add_parser("throughput", help="offline throughput of LLM.generate on a batch of requests")
    add_engine_args(t)
    t.add_argument("--input-len", type=int, default=None, help="prompt tokens (random ids; default 1024)")
    t.add_argument("--output-len", type=int, default=None, help="output tokens per request (default 128)")
    t.add_argument("--num-prompts", type=int, default=1000)
    t.add_argument("--dataset-path", default=None, help="prompts, one per line (output: --output-len)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output-json", default=None, help="write the figures to this JSON file")
    t.add_argument("--plot", default=None, metavar="DIR", help="write TTFT and TPOT CDFs (PNG)")
    t.add_argument("--disable-detokenize", action="store_true", help="accepted for vLLM compatibility")
    t.set_defaults(bench_func=throughput)

    lat = sub.add_parser("latency", help="offline latency of one batch through LLM.generate")
    add_engine_args(lat)
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--num-iters-warmup", type=int, default=10)
    lat.add_argument("--num-iters", type=int, default=30)
    lat.add_argument("--seed", type=int, default=0)
    lat.add_argument("--output-json", default=None, help="write the figures to this JSON file")
    lat.add_argument("--plot", default=None, metavar="DIR", help="write the CDF of the iterations' latency (PNG)")
    lat.set_defaults(bench_func=latency)


def _positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _llm(engine_kwargs: dict):  # noqa: ANN202 - kvserve.LLM
    from kvserve import LLM

    return LLM(**engine_kwargs)


def _random_prompts(llm, n: int, length: int, seed: int) -> list[list[int]]:  # noqa: ANN001 - an LLM
    rng = random.Random(seed)
    vocab = llm.engine.lm.config.vocab_size
    lo, hi = min(100, vocab // 4), max(min(100, vocab // 4) + 1, vocab - min(100, vocab // 4))
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


class StepCount:
    """A step observer: engine steps and tokens computed while it is attached."""

    def __init__(self, llm) -> None:  # noqa: ANN001 - an LLM
        self.steps = self.tokens = 0
        self.engine = llm.engine
        self.engine.step_observers.append(self)

    def __call__(self, so, dt: float) -> None:  # noqa: ANN001 - a SchedulerOutput
        if so.scheduled:
            self.steps += 1
            self.tokens += so.total_num_tokens

    def roofline(self, elapsed: float) -> tuple[str, dict]:
        """Each step reads every weight once; each token computed costs 2 FLOP per weight."""
        from kvserve import roofline

        lm = self.engine.lm
        bytes_s = lm.weight_bytes * self.steps / elapsed
        flop_s = 2 * lm.num_params * self.tokens / elapsed
        figures = {"steps": self.steps, "weight_bytes": lm.weight_bytes, "weight_gb_per_s": bytes_s / 1e9,
                   "gflop_per_s": flop_s / 1e9}
        return roofline.line(roofline.cached(self.engine.device), bytes_s, flop_s), figures


def _write_json(path: str | None, figures: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(figures, indent=1))
        print(f"result: {path}")


def throughput(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from kvserve import SamplingParams

    _positive(input_len=args.input_len, output_len=args.output_len, num_prompts=args.num_prompts)
    if args.dataset_path and args.input_len is not None:
        raise InvalidRequestError("--input-len and --dataset-path exclude each other")
    plot_dir = plot.check_available(args.plot)
    out_len = args.output_len or 128
    llm = _llm(engine_kwargs)
    try:
        if args.dataset_path:
            p = Path(args.dataset_path)
            if not p.is_file():
                raise InvalidRequestError(f"--dataset-path {args.dataset_path}: no such file")
            lines = [ln for ln in p.read_text("utf-8").splitlines() if ln.strip()]
            if not lines:
                raise InvalidRequestError(f"--dataset-path {args.dataset_path} holds no prompt")
            tok = llm.get_tokenizer()
            prompts = [tok.encode(lines[i % len(lines)]) for i in range(args.num_prompts)]
        else:
            prompts = _random_prompts(llm, args.num_prompts, args.input_len or 1024, args.seed)
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
        count = StepCount(llm)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        roof, roof_figures = count.roofline(elapsed)
    finally:
        llm.shutdown()
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    figures = {"elapsed_time": elapsed, "num_requests": len(outs), "total_num_tokens": n_in + n_out,
               "total_input_tokens": n_in, "total_output_tokens": n_out,
               "requests_per_second": len(outs) / elapsed, "tokens_per_second": (n_in + n_out) / elapsed,
               "output_tokens_per_second": n_out / elapsed}
    ttfts = [o.metrics.ttft for o in outs if o.metrics.ttft is not None]
    tpots = [(o.metrics.e2e - o.metrics.ttft) / (len(o.outputs[0].token_ids) - 1) for o in outs
             if o.metrics.ttft is not None and o.metrics.e2e is not None and len(o.outputs[0].token_ids) > 1]
    figures.update(summarize_ms("ttft", ttfts))
    figures.update(summarize_ms("tpot", tpots))
    figures.update(roof_figures)
    print(f"Throughput: {figures['requests_per_second']:.2f} requests/s, {figures['tokens_per_second']:.2f} "
          f"total tokens/s, {figures['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {n_in}")
    print(f"Total num output tokens:  {n_out}")
    print(f"Mean TTFT (ms): {figures['mean_ttft_ms']:.2f}  Mean TPOT (ms): {figures['mean_tpot_ms']:.2f}")
    print(roof)
    _write_json(args.output_json, figures)
    if plot_dir is not None:
        for w in (plot.cdf(plot_dir / "ttft_cdf.png", {"TTFT": ttfts}, "TTFT (ms)", "Time to first token (offline)"),
                  plot.cdf(plot_dir / "tpot_cdf.png", {"TPOT": tpots}, "TPOT (ms)", "Time per output token (offline)")):
            if w is not None:
                print(f"plot: {w}")
    return 0


def latency(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from kvserve import SamplingParams

    _positive(input_len=args.input_len, output_len=args.output_len, batch_size=args.batch_size,
              num_iters=args.num_iters)
    if args.num_iters_warmup < 0:
        raise InvalidRequestError(f"--num-iters-warmup must be >= 0, got {args.num_iters_warmup}")
    plot_dir = plot.check_available(args.plot)
    llm = _llm(engine_kwargs)
    try:
        prompts = _random_prompts(llm, args.batch_size, args.input_len, args.seed)
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

        def once() -> float:
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - t0

        for _ in range(args.num_iters_warmup):
            once()
        count = StepCount(llm)
        latencies = [once() for _ in range(args.num_iters)]
        roof, roof_figures = count.roofline(sum(latencies))
    finally:
        llm.shutdown()
    v = sorted(latencies)
    pct = {str(p): quantile(v, p / 100) for p in (10, 25, 50, 75, 90, 99)}
    figures = {"avg_latency": sum(v) / len(v), "latencies": latencies, "percentiles": pct, **roof_figures}
    print(f"Avg latency: {figures['avg_latency']:.4f} seconds")
    for p, x in pct.items():
        print(f"{p}% percentile latency: {x:.4f} seconds")
    print(roof)
    _write_json(args.output_json, figures)
    if plot_dir is not None:
        w = plot.cdf(plot_dir / "latency_cdf.png", {f"batch of {args.batch_size}": latencies}, "latency (ms)",
                     f"End-to-end latency of a batch ({args.input_len} in, {args.output_len} out)")
        print(f"plot: {w}")
    return 0


"""Automatic prefix caching: a shared system prompt, caching on vs off, in one run.

64 requests share a 1,024-token system prompt, each with its own ~32-token question and 64
output tokens (ignore_eos), kept 16 in flight (a new one arrives when one finishes). Prints
TTFT p50/p99 and output throughput for caching on and off, then one JSON line.

    python benchmarks/prefix_cache.py [--num-requests 64] [--prefix-len 1024] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def run(loaded, args, prompts, caching: bool) -> dict:
    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine

    eng = LLMEngine(loaded=loaded, kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=caching,
                    max_num_seqs=args.concurrency)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    eng.add_request("warm", prompts[0][:8], SamplingParams(max_tokens=2))
    while eng.has_unfinished_requests():
        eng.step()
    pending = list(range(len(prompts)))
    ttft, n_out = [], 0
    in_flight = 0
    t0 = time.perf_counter()
    while pending or eng.has_unfinished_requests():
        while pending and in_flight < args.concurrency:
            i = pending.pop(0)
            eng.add_request(f"q{i}", prompts[i], params)
            in_flight += 1
        for out in eng.step():
            if out.finished:
                in_flight -= 1
                ttft.append(out.metrics.ttft)
                n_out += len(out.outputs[0].token_ids)
    dur = time.perf_counter() - t0
    st = eng.stats()
    return {"seconds": round(dur, 2), "output_tok_s": round(n_out / dur, 2),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3), "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
            "prefix_hit_rate": round(st["prefix_cache_hits"] / max(1, st["prefix_cache_queries"]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--quantization", default="none", help="kvserve --quantization (auto: int4 for the default GGUF)")
    args = ap.parse_args()

    from kvserve.loader import load_model

    loaded = load_model(args.model, dtype=args.dtype, quantization=args.quantization)
    rng = np.random.default_rng(0)
    system = rng.integers(100, 49000, size=args.prefix_len).tolist()
    prompts = [system + rng.integers(100, 49000, size=int(rng.integers(args.question_len - 8, args.question_len + 9))).tolist()
               for _ in range(args.num_requests)]
    on = run(loaded, args, prompts, caching=True)
    print("caching on:", on, flush=True)
    off = run(loaded, args, prompts, caching=False)
    print("caching off:", off, flush=True)
    print(json.dumps({"workload": f"{args.num_requests} req, shared {args.prefix_len} + ~{args.question_len} tokens, "
                                  f"{args.output_len} out, concurrency {args.concurrency}, {args.dtype}, "
                                  f"{loaded.quantization} weights",
                      "on": on, "off": off,
                      "ttft_p50_improvement": round(off["ttft_p50_s"] / on["ttft_p50_s"], 2),
                      "throughput_improvement": round(on["output_tok_s"] / off["output_tok_s"], 2)}))


if __name__ == "__main__":
    main()

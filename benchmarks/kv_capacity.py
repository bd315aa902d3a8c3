"""KV cache capacity: what one fixed KV budget holds, and what that buys, per KV cache dtype.

For each --kv-cache-dtype (float32, bfloat16, int8) on the same model and the same KV memory:
tokens the cache holds, the most sequences of (prompt + new) tokens that fit at once, and the
output throughput of a workload run at that concurrency (twice as many requests as fit, all
submitted at once, so the cache stays full). Then the perplexity through each cache (as
`kvserve eval ppl --kv-cache-dtype`) on a long English text, against the fresh-K/V value.

    python benchmarks/kv_capacity.py                 # 96 MiB of KV, 128 + 128 tokens per sequence
"""

from __future__ import annotations

import argparse
import json
import time

DTYPES = ("float32", "bfloat16", "int8")


def english_text() -> str:
    from pydoc_data.topics import topics

    keys = ("assignment", "class", "exceptions", "execmodel", "function", "naming")
    return "\n\n".join(topics[k] for k in keys) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default="auto")
    p.add_argument("--kv-cache-memory", default="96MiB")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-ppl", action="store_true")
    args = p.parse_args()

    import torch

    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.eval.perplexity import perplexity
    from kvserve.loader import load_model

    torch.set_num_threads(torch.get_num_threads())
    lm = load_model(args.model, quantization=args.quantization)
    print(lm.describe(), flush=True)
    pool = lm.tokenizer.encode(english_text() * 4)
    seq_len = args.prompt_len + args.new_tokens
    rows = {}
    for kv in DTYPES:
        probe = LLMEngine(loaded=lm, kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=kv)
        blocks_per_seq = -(-seq_len // probe.config.block_size)
        fit = probe.kv.num_blocks // blocks_per_seq
        del probe
        eng = LLMEngine(loaded=lm, kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=kv, max_num_seqs=fit,
                        enable_prefix_caching=False)
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        n_req = 2 * fit
        for i in range(n_req):
            s = (i * 131) % (len(pool) - args.prompt_len)
            eng.add_request(f"{kv}-{i}", pool[s : s + args.prompt_len], params)
        t0 = time.perf_counter()
        peak_running = 0
        while eng.has_unfinished_requests():
            eng.step()
            peak_running = max(peak_running, len(eng.scheduler.running))
        dt = time.perf_counter() - t0
        rows[kv] = {"kv_tokens": eng.budget.kv_tokens, "bytes_per_token": eng.budget.kv_bytes_per_token,
                    "max_concurrency": fit, "peak_running": peak_running,
                    "preemptions": eng.scheduler.num_preemptions,
                    "output_tok_s": n_req * args.new_tokens / dt}
        print(f"{kv}: {rows[kv]}", flush=True)
    if not args.no_ppl:
        text = english_text()
        fresh = perplexity(lm, text, ctx=512).ppl
        for kv in DTYPES:
            rows[kv]["ppl"] = perplexity(lm, text, ctx=512, kv_cache_dtype=kv).ppl
            rows[kv]["ppl_vs_fresh"] = rows[kv]["ppl"] / fresh - 1
        print(f"perplexity with fresh K/V: {fresh:.4f}")

    base = rows["float32"]
    print(f"\nKV budget {args.kv_cache_memory}, sequences of {args.prompt_len} + {args.new_tokens} tokens")
    print(f"{'kv dtype':10s}{'B/token':>9s}{'tokens':>9s}{'max seqs':>10s}{'x fp32':>8s}{'out tok/s':>11s}"
          f"{'x fp32':>8s}{'ppl':>10s}{'vs fresh':>10s}")
    for kv, r in rows.items():
        ppl = f"{r['ppl']:10.4f}{r['ppl_vs_fresh']:+10.2%}" if "ppl" in r else ""
        print(f"{kv:10s}{r['bytes_per_token']:9d}{r['kv_tokens']:9d}{r['max_concurrency']:10d}"
              f"{r['max_concurrency'] / base['max_concurrency']:8.2f}{r['output_tok_s']:11.1f}"
              f"{r['output_tok_s'] / base['output_tok_s']:8.2f}{ppl}")
    print(json.dumps({"kv_cache_memory": args.kv_cache_memory, "weights": lm.describe(), **rows}))


if __name__ == "__main__":
    main()

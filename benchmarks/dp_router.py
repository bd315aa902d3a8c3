"""Data-parallel routing: prefix-aware vs round-robin on a shared-prefix workload.

Two engine replicas (in-process, sharing one random-weight small Llama) behind the
DataParallelEngine front the server uses. 16 system prompts of 256 tokens, 8 requests each with
its own 16-token question, shuffled, 8 in flight at a time, 4 output tokens each. Each
replica's KV cache holds about half of the prefixes, so a router that scatters a prefix's
requests over both replicas makes each cache hold, and evict, all of them. Prints the prefix
cache hit rate (hit tokens / looked-up prompt tokens, over both replicas) and wall time per
policy, then one JSON line.

    python benchmarks/dp_router.py [--replicas 2] [--prefixes 16] [--per-prefix 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


async def drive(front, prompts: list[list[int]], concurrency: int) -> None:
    from kvserve import SamplingParams

    sem = asyncio.Semaphore(concurrency)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def one(i: int, p: list[int]) -> None:
        async with sem:
            async for _ in front.generate(f"r{i}", p, params):
                pass

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def run(lm, prompts: list[list[int]], args: argparse.Namespace, policy: str) -> dict:
    from kvserve.distributed.data_parallel import DataParallelEngine
    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.engine.llm_engine import LLMEngine

    # each replica: room for about half of the prefixes plus the running requests' own blocks
    blocks = (args.prefixes // 2) * (args.prefix_len // 16) + args.concurrency * 4
    replicas = [AsyncLLMEngine(LLMEngine(loaded=lm, kv_cache_memory=blocks * 16 * lm.config.num_layers * 2
                                         * lm.config.num_kv_heads * lm.config.head_dim * 4, max_num_seqs=args.concurrency))
                for _ in range(args.replicas)]
    front = DataParallelEngine(replicas, policy)
    t0 = time.perf_counter()
    asyncio.run(drive(front, prompts, args.concurrency))
    wall = time.perf_counter() - t0
    time.sleep(0.6)  # the engine threads refresh their stats every 0.5 s while busy
    per = [r.engine.stats() for r in replicas]
    front.shutdown()
    hits, queries = sum(s["prefix_cache_hits"] for s in per), sum(s["prefix_cache_queries"] for s in per)
    return {"policy": policy, "hit_rate": round(hits / queries, 4), "wall_s": round(wall, 2),
            "routed": list(front.router.routed), "blocks_per_replica": per and replicas[0].engine.kv.num_blocks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--prefixes", type=int, default=16)
    ap.add_argument("--per-prefix", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import make_tiny_hf

    from kvserve.loader import load_model

    path = make_tiny_hf(Path(tempfile.mkdtemp(prefix="kvserve-dp-")), "llama", hidden_size=128, intermediate_size=256,
                        num_hidden_layers=4, max_position_embeddings=1024)
    lm = load_model(path)
    rng = np.random.default_rng(0)
    vocab = lm.config.vocab_size
    prefixes = [rng.integers(0, vocab, size=args.prefix_len).tolist() for _ in range(args.prefixes)]
    prompts = [prefixes[j] + rng.integers(0, vocab, size=16).tolist()
               for j in range(args.prefixes) for _ in range(args.per_prefix)]
    order = rng.permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    print(f"{args.replicas} replicas, {len(prompts)} requests: {args.prefixes} prefixes of {args.prefix_len} tokens "
          f"x {args.per_prefix} questions, {args.concurrency} in flight")
    results = []
    for policy in ("round_robin", "prefix"):
        r = run(lm, prompts, args, policy)
        results.append(r)
        print(f"{policy:>12}: prefix cache hit rate {r['hit_rate']:.1%}, wall {r['wall_s']:.2f}s, "
              f"routed {r['routed']} ({r['blocks_per_replica']} blocks per replica)", flush=True)
    print(json.dumps({"benchmark": "dp_router", "replicas": args.replicas, "requests": len(prompts),
                      "results": results}))


if __name__ == "__main__":
    main()

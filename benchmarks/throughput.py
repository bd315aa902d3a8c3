"""Offline throughput: kvserve vs transformers `generate` on the same prompts, in one run.

64 requests; prompt and output lengths uniform in [32, 256] (fixed seed); ignore_eos, greedy.
transformers runs the same prompts batched and left-padded, same dtype, max_new_tokens = the
longest output (it cannot stop rows early with ignore_eos), so only the requested tokens of
each row are counted for it.

Prints one JSON line last. Usage:
    python benchmarks/throughput.py [--num-prompts 64] [--dtype float32] [--hf-batch 64] [--no-baseline]
                                    [--measure-waste]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def make_workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(lo, hi + 1, size=n)
    out_lens = rng.integers(lo, hi + 1, size=n)
    # token ids from the ordinary part of the vocabulary (no control tokens)
    prompts = [rng.integers(100, vocab - 100, size=int(k)).tolist() for k in in_lens]
    return prompts, [int(k) for k in out_lens]


def run_kvserve(args, prompts, out_lens) -> dict:
    from kvserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    eng = llm.engine
    from kvserve.bench.offline import StepCount

    counter = StepCount(llm)  # steps and tokens, for the roofline line
    t = time.perf_counter()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"b{i}", p, sp)
    outs, waste, timed = [], [], 0.0
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
        if args.measure_waste:  # excluded from the timing
            t_w = time.perf_counter()
            waste.append(eng.kv.internal_waste({r.request_id: r.num_computed_tokens for r in eng.scheduler.running}))
            timed += time.perf_counter() - t_w
    dt = time.perf_counter() - t - timed
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(out_lens)
    ttfts = sorted(o.metrics.ttft for o in outs)
    res = {"seconds": round(dt, 2), "output_tok_s": round(n_out / dt, 1),
           "total_tok_s": round((n_out + sum(map(len, prompts))) / dt, 1),
           "ttft_p50_s": round(ttfts[len(ttfts) // 2], 2), "preemptions": eng.scheduler.num_preemptions}
    res["roofline"] = counter.roofline(dt)[0]
    if waste:
        res["kv_internal_waste_mean"] = round(sum(waste) / len(waste), 4)
        res["kv_internal_waste_max"] = round(max(waste), 4)
    return res


def run_transformers(args, prompts, out_lens, path) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    t = time.perf_counter()
    for b in range(0, len(prompts), args.hf_batch):
        batch = prompts[b : b + args.hf_batch]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                           max_new_tokens=max(out_lens[b : b + args.hf_batch]),
                           min_new_tokens=max(out_lens[b : b + args.hf_batch]))
    dt = time.perf_counter() - t
    n_out = sum(out_lens)
    return {"seconds": round(dt, 2), "output_tok_s": round(n_out / dt, 1),
            "total_tok_s": round((n_out + sum(map(len, prompts))) / dt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--measure-waste", action="store_true", help="sample KV internal waste after every step")
    args = ap.parse_args()

    from kvserve.loader import default_model_path

    path = default_model_path() if args.model is None else args.model
    ours = run_kvserve(args, *make_workload(args.num_prompts, args.min_len, args.max_len, 49152, args.seed))
    result = {"workload": f"{args.num_prompts} req, in/out U[{args.min_len},{args.max_len}], ignore_eos, {args.dtype}",
              "threads": torch.get_num_threads(), "kvserve": ours}
    print("kvserve:", ours, flush=True)
    if not args.no_baseline:
        prompts, out_lens = make_workload(args.num_prompts, args.min_len, args.max_len, 49152, args.seed)
        hf = run_transformers(args, prompts, out_lens, path)
        print("transformers:", hf, flush=True)
        result["transformers"] = hf
        result["output_speedup"] = round(ours["output_tok_s"] / hf["output_tok_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

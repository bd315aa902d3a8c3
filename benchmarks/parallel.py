"""Tensor and pipeline parallelism on this machine: prefill and decode tok/s at TP=1/2, PP=1/2.

A random-weight Llama with the Llama-3.2-1B shape (hidden 2048, 32 heads, 8 KV heads,
intermediate 8192, vocab 128256, tied embeddings), bf16, but only --layers of its 16 layers so
that every configuration runs in a couple of minutes on 2 CPU cores (the output says how many).
Each configuration is a fresh engine; workers run 1 thread each, TP=1/PP=1 gets
--threads (default: every core), so every run uses the same cores (on 2 cores, TP=2 x PP=2
runs 4 processes on 2 cores). Also printed: the bytes each TP rank all-reduces per token for the
whole model, (2 x layers + 1) x hidden x 2 bytes (one all-reduce after attention and one after
the MLP of every layer, one after the vocab-parallel embedding), and as counted on rank 0 (which,
under PP, only runs its own stage's layers).

On 2 shared cores the speed-up is not the point; these are the baseline for GPU machines.

    python benchmarks/parallel.py [--layers 4] [--configs 1x1,2x1,1x2,2x2] [--batch 4] [--prompt-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
             head_dim=64, vocab_size=128256, max_position_embeddings=4096, rms_norm_eps=1e-5,
             rope_theta=500000.0, tie_word_embeddings=True)


def write_random_llama(path: Path, layers: int, seed: int = 0) -> int:
    """A Hugging Face directory (config, bf16 safetensors, a small byte tokenizer); returns #params."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import tiny_tokenizer_json

    bos, eos = tiny_tokenizer_json(path)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
           "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "bfloat16", **SHAPE}
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    H, I, D = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * D, SHAPE["num_key_value_heads"] * D

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(SHAPE["vocab_size"], H), "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": w(q, H), p + "self_attn.k_proj.weight": w(kv, H),
              p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.o_proj.weight": w(H, q),
              p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H), p + "mlp.down_proj.weight": w(H, I),
              p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
              p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)}
    save_file(t, str(path / "model.safetensors"))
    return sum(x.numel() for x in t.values())


def run(path: Path, tp: int, pp: int, args: argparse.Namespace) -> dict:
    from kvserve import SamplingParams
    from kvserve.distributed import parallel_state as ps
    from kvserve.engine.llm_engine import LLMEngine

    world = tp * pp
    t0 = time.perf_counter()
    eng = LLMEngine(model=str(path), dtype="bfloat16", kv_cache_memory="256MiB", max_num_batched_tokens=4096,
                    tensor_parallel_size=tp, pipeline_parallel_size=pp,
                    num_threads=args.threads if world == 1 else 1)
    start_s = time.perf_counter() - t0
    try:
        rng = np.random.default_rng(0)
        vocab = SHAPE["vocab_size"]

        def batch(tag: str, max_tokens: int) -> None:
            for b in range(args.batch):
                ids = rng.integers(0, vocab, size=args.prompt_len).tolist()
                eng.add_request(f"{tag}{b}", ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

        def timed(tag: str) -> tuple[float, float]:
            """(prefill seconds: until every request has its first token, decode seconds: the rest)."""
            batch(tag, args.decode_tokens + 1)
            t0 = time.perf_counter()
            prefill_s = t_dec = None
            while eng.has_unfinished_requests():
                eng.step()
                if prefill_s is None and not eng.scheduler.waiting and \
                        all(len(r.output_token_ids) >= 1 for r in eng.scheduler.running):
                    t_dec = time.perf_counter()
                    prefill_s = t_dec - t0
            return prefill_s, time.perf_counter() - t_dec

        timed("warm")  # the same workload once untimed: first-touch and kernel set-up out of the figures
        ar0 = ps.allreduce_bytes
        prefill_s, decode_s = timed("r")
        prompt_tokens = args.batch * args.prompt_len
        decode_tokens = args.batch * args.decode_tokens
        ar = ps.allreduce_bytes - ar0
        res = {"tp": tp, "pp": pp, "processes": world, "start_s": round(start_s, 1),
               "prefill_tok_s": round(prompt_tokens / prefill_s, 1), "decode_tok_s": round(decode_tokens / decode_s, 2),
               # rank 0 all-reduces for its own stage's layers; the whole model per token is the formula's
               "allreduce_bytes_per_token_rank0": round(ar / (prompt_tokens + decode_tokens)) if tp > 1 else 0,
               "allreduce_bytes_per_token_model": (2 * args.layers + 1) * SHAPE["hidden_size"] * 2 if tp > 1 else 0}
        if pp > 1:
            res["pipeline_bubble"] = round(eng.pipeline_stats()["pipeline_bubble"], 3)
        return res
    finally:
        eng.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="layers of the 16 of Llama-3.2-1B")
    ap.add_argument("--configs", default="1x1,2x1,1x2,2x2", help="TPxPP list")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="threads of the TP=1/PP=1 run")
    args = ap.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    args.threads = args.threads or os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="kvserve-par-"))
    try:
        n = write_random_llama(tmp, args.layers)
        H = SHAPE["hidden_size"]
        print(f"model: random Llama-3.2-1B shape, {args.layers} of 16 layers (fewer, to run in minutes on "
              f"2 cores), {n / 1e6:.0f}M params, bf16; batch {args.batch} x {args.prompt_len} prompt tokens, "
              f"{args.decode_tokens} decode steps; torch threads: {args.threads} at TP=PP=1, 1 per worker")
        print(f"all-reduce per token (formula): (2 x {args.layers} + 1) x {H} x 2 bytes = "
              f"{(2 * args.layers + 1) * H * 2} bytes at TP>1")
        results = []
        for tp, pp in configs:
            r = run(tmp, tp, pp, args)
            results.append(r)
            print(f"TP={tp} PP={pp}: prefill {r['prefill_tok_s']:8.1f} tok/s   decode {r['decode_tok_s']:7.2f} tok/s   "
                  f"all-reduce {r['allreduce_bytes_per_token_model']} B/token "
                  f"(rank 0 measured {r['allreduce_bytes_per_token_rank0']})   (start {r['start_s']}s"
                  + (f", bubble {r['pipeline_bubble']}" if "pipeline_bubble" in r else "") + ")", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"benchmark": "parallel", "layers": args.layers, "params_m": round(n / 1e6), "dtype": "bfloat16",
                      "results": results}))


if __name__ == "__main__":
    main()

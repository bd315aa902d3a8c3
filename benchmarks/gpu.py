"""GPU benchmark in one call: card figures, kernel correctness, decode vs roofline, throughput, baseline.

1. the card's copy bandwidth and bf16 GEMM rate;
2. the Triton kernels against the torch reference on the GPU (max relative error, bf16), and the
   greedy tokens of a tiny random Llama through Triton + CUDA graphs against the all-torch engine
   (fp32 and bf16);
3. a Llama-3-8B-shaped model with random bf16 weights through the engine: decode tok/s at
   batch 1 (as a fraction of the roofline = measured bandwidth / weight bytes), 32 and 128;
4. throughput on the Qwen3-0.6B shape: 256 requests, prompt and output lengths uniform in
   [100, 1024], ignore_eos;
5. transformers `generate` on the 8B shape at batch 1 and 128 in the same process, and the ratio.

Prints a table, then one JSON line last (and writes it to --json PATH). Every section is timed against --budget-s and
skipped (with the reason in the JSON) when too little time is left; a failing section is
reported and the others still run.

    python benchmarks/gpu.py                   # on the GPU machine
    python benchmarks/gpu.py --tiny            # dry run on CPU: tiny shapes, kernels in the interpreter
    python benchmarks/gpu.py --tiny --attention-backend triton   # the engine on the interpreted kernels

Decode steps replay CUDA graphs (captured when each engine starts; capture time reported) unless
--enforce-eager; they need CUDA and the Triton backend, so the CPU dry run is always eager.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", "--dry-run", action="store_true", help="tiny shapes on CPU (a dry run of the script)")
    ap.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"))
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip sections that would overrun this")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per request in section 3/5")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers")
    ap.add_argument("--enforce-eager", action="store_true", help="no decode CUDA graphs")
    ap.add_argument("--json", help="also write the JSON of all figures to this file")
    return ap.parse_args()


ARGS = parse_args()

import numpy as np
import torch

if not torch.cuda.is_available():
    # without a GPU the kernels run in Triton's interpreter; this must precede triton's first import
    # (kvserve imports triton lazily, torch does not import it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvserve import SamplingParams
from kvserve.config import ModelConfig

LLAMA3_8B = dict(architecture="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=8192,
                 rope_theta=500000.0, norm_eps=1e-5, name="llama-3-8b-shape")
QWEN3_06B = dict(architecture="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
                 num_kv_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
                 rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True, tie_word_embeddings=True,
                 name="qwen3-0.6b-shape")
TINY = dict(architecture="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, intermediate_size=128, max_position_embeddings=4096, name="tiny")

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


# -- 1. the card ----------------------------------------------------------------------------------


def card_figures(device: torch.device, tiny: bool) -> dict:
    nbytes = 2**24 if tiny else 2**30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, iters=5 if tiny else 20)
    bandwidth = 2 * nbytes / t  # a copy reads and writes every byte
    n = 256 if tiny else 8192
    dtype = torch.float32 if tiny else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, iters=5 if tiny else 20)
    return {"copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "gemm_TFLOPs": float(f"{2 * n**3 / t / 1e12:.3g}"),
            "gemm_shape": f"{n}^3 {str(dtype).removeprefix('torch.')}"}


# -- 2. kernel correctness ------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


@torch.inference_mode()
def kernel_correctness(device: torch.device, tiny: bool) -> dict:
    from kvserve.kernels.testing import clone_cache, make_case, torch_reference
    from kvserve.kernels.triton.backend import TritonAttentionBackend
    from kvserve.kernels.triton.fused import rms_norm, rotary_embedding, silu_and_mul
    from kvserve.layers.activation import SiluAndMul
    from kvserve.layers.norm import RMSNorm
    from kvserve.layers.rotary import RotaryEmbedding

    bf16 = torch.bfloat16
    h, hkv, d = (8, 2, 64) if tiny else (32, 8, 128)
    long = 70 if tiny else 3000
    # decodes (one long enough to be split), a prefill, an extend over a cached prefix
    qlens, slens = [1, 1, 24, 9], [long, 5, 24, 40]
    res = {}
    for name, int8 in (("paged_attention_bf16", False), ("paged_attention_int8_kv", True)):
        case = make_case(qlens, slens, h, hkv, d, block_size=16, dtype=bf16, int8=int8, seed=1, device=device)
        ref_case = make_case(qlens, slens, h, hkv, d, block_size=16, dtype=torch.float32, int8=int8, seed=1,
                             device=device)
        want, _ = torch_reference(ref_case, d**-0.5)  # fp32 math on the fp32 originals of the bf16 inputs
        got = TritonAttentionBackend().run(case.q, case.k, case.v, clone_cache(case.kv_cache), case.meta,
                                               d**-0.5)
        res[name] = rel_err(got, want)

    def torch_path(fn, *a, **kw):
        os.environ["KVSERVE_DISABLE_TRITON"] = "1"
        try:
            return fn(*a, **kw)
        finally:
            del os.environ["KVSERVE_DISABLE_TRITON"]

    g = torch.Generator().manual_seed(0)
    hidden = 64 if tiny else 4096
    x = torch.randn(33, hidden, generator=g).to(device, bf16)
    r = torch.randn(33, hidden, generator=g).to(device, bf16)
    norm = RMSNorm(hidden).to(device, bf16)
    got, got_res = rms_norm(x, norm.weight, norm.eps, r)
    want, want_res = torch_path(norm, x, residual=r)
    res["rms_norm_residual"] = max(rel_err(got, want), rel_err(got_res, want_res))
    gu = torch.randn(33, 2 * hidden, generator=g).to(device, bf16)
    res["silu_and_mul"] = rel_err(silu_and_mul(gu), torch_path(SiluAndMul(), gu))
    rope = RotaryEmbedding(d, d, 8192, 500000.0).to(device)
    pos = torch.randint(0, 8192, (33,), generator=g).to(device)
    q = torch.randn(33, h, d, generator=g).to(device, bf16)
    k = torch.randn(33, hkv, d, generator=g).to(device, bf16)
    got_q, got_k = rotary_embedding(pos, q, k, rope.cos_cached, rope.sin_cached, d)
    want_q, want_k = torch_path(rope, pos, q, k)
    res["rotary"] = max(rel_err(got_q, want_q), rel_err(got_k, want_k))
    return {k: float(f"{v:.2e}") for k, v in res.items()}


# -- models ---------------------------------------------------------------------------------------


class NullTokenizer:
    """Random-weight models have no vocabulary: detokenization is skipped (decode returns no text)."""

    eos_token_ids: tuple[int, ...] = ()
    eos_token_id = None
    bos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError("random-weight model: pass token ids")


def random_model(shape: dict, dtype: torch.dtype, device: torch.device):
    """A kvserve Llama-family model with random weights, built directly on the device in `dtype`."""
    from kvserve.loader import LoadedModel
    from kvserve.models.llama import LlamaForCausalLM

    cfg = ModelConfig(**shape)
    t = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype, never in fp32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.eval()
    sync(device)
    return LoadedModel(model=model, config=cfg, tokenizer=NullTokenizer(), path=Path(cfg.name), dtype=dtype,
                       load_seconds=time.perf_counter() - t)


def make_engine(loaded, device: torch.device, **kw):
    from kvserve.engine.llm_engine import LLMEngine

    kw.setdefault("enable_prefix_caching", False)
    return LLMEngine(loaded=loaded, device=str(device), attention_backend=ARGS.attention_backend,
                     enforce_eager=ARGS.enforce_eager, **kw)


def graph_info(eng) -> dict:
    g = eng.runner.graphs
    return {"cuda_graphs": g is not None and g.mode == "cuda",
            "graph_sizes": g.sizes if g is not None else [],
            "capture_s": round(g.capture_seconds, 2) if g is not None else None}


def run_requests(eng, prompts: list[list[int]], out_lens: list[int], tag: str) -> dict:
    """Run requests to completion; the first step's end marks the end of a one-step prefill."""
    for i, (p, n) in enumerate(zip(prompts, out_lens)):
        eng.add_request(f"{tag}{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    sync(eng.device)
    t0 = time.perf_counter()
    t1 = None
    steps = 0
    n_out = 0
    one_step_prefill = False
    while eng.has_unfinished_requests():
        outs = eng.step()
        n_out += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
        steps += 1
        if steps == 1:  # the step ends with the sampled ids on the host: the device is done
            t1 = time.perf_counter()
            one_step_prefill = not eng.scheduler.waiting and all(
                r.num_tokens == r.num_prompt_tokens + 1 for r in eng.scheduler.running)
    t2 = time.perf_counter()
    assert n_out == sum(out_lens), (n_out, sum(out_lens))
    return {"seconds": t2 - t0, "first_step_s": t1 - t0, "rest_s": t2 - t1, "steps": steps, "output_tokens": n_out,
            "one_step_prefill": one_step_prefill}


def rand_prompts(rng: np.random.Generator, n: int, lens, vocab: int) -> list[list[int]]:
    return [rng.integers(100, vocab - 100, size=int(k)).tolist() for k in lens[:n]]


# -- 3. decode on the 8B shape --------------------------------------------------------------------


def decode_8b(device: torch.device, dtype: torch.dtype, shape: dict, batches: list[int], bandwidth: float | None,
              prompt_len: int, new_tokens: int) -> dict:
    loaded = random_model(shape, dtype, device)
    weight_bytes = loaded.weight_bytes
    emb = loaded.model.model.embed_tokens.weight
    # a decode step reads only b rows of an untied embedding table: the roofline counts the rest
    streamed = weight_bytes - (0 if shape.get("tie_word_embeddings") else emb.numel() * emb.element_size())
    max_b = max(batches)
    kv_per_token = 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * emb.element_size()
    kv_bytes = int(kv_per_token * max_b * (prompt_len + new_tokens + 32) * 1.2)
    eng = make_engine(loaded, device, max_num_seqs=max_b, max_num_batched_tokens=max(max_b * prompt_len, 2048),
                      kv_cache_memory=kv_bytes, max_model_len=prompt_len + new_tokens + 32)
    rng = np.random.default_rng(0)
    out = {"weight_GB": float(f"{weight_bytes / 1e9:.3g}"), "streamed_weight_GB": float(f"{streamed / 1e9:.3g}"), "init_s": round(loaded.load_seconds, 1),
           **graph_info(eng), "batches": {}}
    for b in batches:
        # warm-up at the same batch: compiles the kernels for this grid (split counts depend on it)
        run_requests(eng, rand_prompts(rng, b, [prompt_len] * b, shape["vocab_size"]), [4] * b, f"w{b}-")
        r = run_requests(eng, rand_prompts(rng, b, [prompt_len] * b, shape["vocab_size"]), [new_tokens] * b, f"d{b}-")
        decode_tok_s = b * (new_tokens - 1) / r["rest_s"]
        row = {"decode_tok_s": round(decode_tok_s, 1), "step_ms": round(1000 * r["rest_s"] / (new_tokens - 1), 2),
               "e2e_tok_s": round(b * new_tokens / r["seconds"], 1), "prefill_s": round(r["first_step_s"], 3),
               "one_step_prefill": r["one_step_prefill"]}
        if bandwidth and b == 1:
            # batch-1 roofline: every step streams all weights once (KV and activations are noise at b=1)
            roofline = bandwidth / streamed
            row["roofline_tok_s"] = round(roofline, 1)
            row["fraction_of_roofline"] = round(decode_tok_s / roofline, 3)
        out["batches"][str(b)] = row
        print(f"  decode batch {b}: {row}", flush=True)
    eng.runner.kv_caches.clear()
    del eng, loaded
    free_memory()
    return out


# -- 4. throughput on the Qwen3-0.6B shape --------------------------------------------------------


def throughput_qwen3(device: torch.device, dtype: torch.dtype, shape: dict, num_requests: int, lo: int, hi: int,
                     kv_cache_memory: str, max_num_batched_tokens: int) -> dict:
    loaded = random_model(shape, dtype, device)
    eng = make_engine(loaded, device, max_num_seqs=256, max_num_batched_tokens=max_num_batched_tokens,
                      kv_cache_memory=kv_cache_memory, max_model_len=2 * hi + 16)
    rng = np.random.default_rng(0)
    in_lens = rng.integers(lo, hi + 1, size=num_requests)
    out_lens = [int(k) for k in rng.integers(lo, hi + 1, size=num_requests)]
    prompts = rand_prompts(rng, num_requests, in_lens, shape["vocab_size"])
    run_requests(eng, rand_prompts(rng, 4, [lo] * 4, shape["vocab_size"]), [8] * 4, "warm")
    r = run_requests(eng, prompts, out_lens, "t")
    res = {"requests": num_requests, "seconds": round(r["seconds"], 2),
           "output_tok_s": round(r["output_tokens"] / r["seconds"], 1),
           "total_tok_s": round((r["output_tokens"] + int(sum(in_lens))) / r["seconds"], 1),
           "preemptions": eng.scheduler.num_preemptions, "steps": r["steps"], **graph_info(eng)}
    eng.runner.kv_caches.clear()
    del eng, loaded
    free_memory()
    return res


# -- 5. transformers baseline ---------------------------------------------------------------------


@torch.inference_mode()
def gen(model, ids: torch.Tensor, mask: torch.Tensor, n: int) -> None:
    """transformers greedy generation of exactly n tokens per row."""
    model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=n,
                   min_new_tokens=n)


def transformers_baseline(device: torch.device, dtype: torch.dtype, shape: dict, batches: list[int],
                          prompt_len: int, new_tokens: int) -> dict:
    import transformers as tf
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = tf.LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                         head_dim=shape["head_dim"], max_position_embeddings=shape["max_position_embeddings"],
                         rms_norm_eps=shape.get("norm_eps", 1e-5), tie_word_embeddings=False)
    t = time.perf_counter()
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    init_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    out = {"init_s": round(init_s, 1), "attn_implementation": getattr(model.config, "_attn_implementation", None),
           "batches": {}}
    for b in batches:
        ids = torch.tensor(rand_prompts(rng, b, [prompt_len] * b, shape["vocab_size"]), device=device)
        mask = torch.ones_like(ids)

        gen(model, ids, mask, 2)  # warm-up
        sync(device)
        t = time.perf_counter()
        gen(model, ids, mask, new_tokens)
        sync(device)
        dt = time.perf_counter() - t
        out["batches"][str(b)] = {"e2e_tok_s": round(b * new_tokens / dt, 1), "seconds": round(dt, 2)}
        print(f"  transformers batch {b}: {out['batches'][str(b)]}", flush=True)
    del model
    free_memory()
    return out


# -- driver ---------------------------------------------------------------------------------------


def greedy_tokens(loaded, device: torch.device, backend: str, prompts: list[list[int]], n: int,
                  enforce_eager: bool) -> tuple[list[list[int]], bool]:
    """Greedy outputs of `prompts` through the engine on `backend` (torch: every layer on torch too)."""
    from kvserve.engine.llm_engine import LLMEngine

    old = os.environ.get("KVSERVE_DISABLE_TRITON")
    if backend == "torch":
        os.environ["KVSERVE_DISABLE_TRITON"] = "1"  # the fused layers too: the reference is all torch
    try:
        eng = LLMEngine(loaded=loaded, device=str(device), attention_backend=backend, enforce_eager=enforce_eager,
                        kv_cache_memory="64MiB", block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
                        enable_prefix_caching=True)
        for i, p in enumerate(prompts):
            eng.add_request(f"g{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = list(o.outputs[0].token_ids)
        graphs = eng.runner.graphs is not None and eng.runner.graphs.mode == "cuda"
        del eng
        return [done[f"g{i}"] for i in range(len(prompts))], graphs
    finally:
        if old is None:
            os.environ.pop("KVSERVE_DISABLE_TRITON", None)
        else:
            os.environ["KVSERVE_DISABLE_TRITON"] = old


def greedy_equality(device: torch.device, dtypes: list[torch.dtype]) -> dict:
    """Triton (+ CUDA graphs on CUDA) vs the all-torch engine on a tiny random Llama: the same greedy tokens?

    The token budget (64) forces chunked prefill, and two prompts share a prefix, so steps mix decodes
    with extends over cached blocks; the first divergent position is reported, not only a yes/no.
    """
    rng = np.random.default_rng(7)
    shared = rng.integers(0, TINY["vocab_size"], 40).tolist()
    prompts = [rng.integers(0, TINY["vocab_size"], n).tolist() for n in (1, 9, 33, 100)]
    prompts += [shared + [5], shared + [7, 8, 9]]
    out = {}
    for dtype in dtypes:
        loaded = random_model(TINY, dtype, device)
        want, _ = greedy_tokens(loaded, device, "torch", prompts, 24, enforce_eager=True)
        got, graphs = greedy_tokens(loaded, device, "triton", prompts, 24, enforce_eager=ARGS.enforce_eager)
        first = [next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None) for g, w in zip(got, want)]
        out[str(dtype).removeprefix("torch.")] = {"equal": got == want, "cuda_graphs": graphs,
                                                  "first_divergence": first}
        del loaded
        free_memory()
    return out


def section(results: dict, name: str, need_s: float, fn, *a, **kw) -> dict | None:
    left = ARGS.budget_s - elapsed()
    if left < need_s:
        results[name] = {"skipped": f"{left:.0f} s left of the budget, needs ~{need_s:.0f} s"}
        print(f"[{name}] skipped: {results[name]['skipped']}", flush=True)
        return None
    print(f"[{name}] at {elapsed():.0f} s", flush=True)
    t = time.perf_counter()
    try:
        res = fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - one broken section must not cost the figures of the others
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
        free_memory()
    res["section_s"] = round(time.perf_counter() - t, 1)
    results[name] = res
    print(f"[{name}] {json.dumps(res)}", flush=True)
    return res


def main() -> None:
    tiny = ARGS.tiny
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not tiny:
        print("no CUDA device: running the tiny dry run instead", flush=True)
        tiny = True
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton_version, "tiny": tiny, "dtype": str(dtype),
        "attention_backend": ARGS.attention_backend, "enforce_eager": ARGS.enforce_eager,
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    print(json.dumps(results), flush=True)
    big, qwen = (TINY, dict(TINY, qk_norm=True, tie_word_embeddings=True, name="tiny-qwen3")) if tiny else (
        LLAMA3_8B, QWEN3_06B)
    batches = [1, 4, 8] if tiny else [1, 32, 128]
    base_batches = [1, 8] if tiny else [1, 128]
    prompt_len = 16 if tiny else ARGS.prompt_len
    new_tokens = 8 if tiny else ARGS.decode_tokens

    card = section(results, "card", 5, card_figures, device, tiny)
    bandwidth = card["copy_bandwidth_GBps"] * 1e9 if card and "copy_bandwidth_GBps" in card else None
    if triton_version is not None:
        section(results, "kernels", 10, kernel_correctness, device, tiny)
    else:
        results["kernels"] = {"skipped": "triton not installed"}
    if triton_version is not None:
        # fp32 first: no bf16 rounding ties, so a mismatch there is a bug, not noise
        section(results, "greedy_tiny", 20, greedy_equality, device,
                [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16])
    section(results, "decode_8b", 60, decode_8b, device, dtype, big, batches, bandwidth, prompt_len, new_tokens)
    if not ARGS.no_baseline:
        section(results, "transformers_8b", 60, transformers_baseline, device, dtype, big, base_batches, prompt_len,
                new_tokens)
    if tiny:
        section(results, "throughput_qwen3", 20, throughput_qwen3, device, dtype, qwen, 16, 8, 32, "16MiB", 128)
    else:
        section(results, "throughput_qwen3", 120, throughput_qwen3, device, dtype, qwen, ARGS.num_requests, 100,
                1024, "40GiB", 8192)
    results["total_s"] = round(elapsed(), 1)
    print_table(results, batches, base_batches)
    print(json.dumps(results))
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(results, indent=1))


def print_table(r: dict, batches: list[int], base_batches: list[int]) -> None:
    def get(*path, default="-"):
        x = r
        for p in path:
            if not isinstance(x, dict) or p not in x:
                return default
            x = x[p]
        return x

    rows = [("copy bandwidth (GB/s)", get("card", "copy_bandwidth_GBps"), ""),
            (f"GEMM {get('card', 'gemm_shape')} (TFLOP/s)", get("card", "gemm_TFLOPs"), "")]
    for dt, g in (r.get("greedy_tiny") or {}).items():
        if isinstance(g, dict) and "equal" in g:
            rows.append((f"tiny greedy Triton == torch, {dt}", g["equal"], "ok" if g["equal"] else "FAIL"))
    kern = r.get("kernels", {})
    for k, v in kern.items():
        if k != "section_s":
            ok = "" if not isinstance(v, float) else ("ok" if v < 2e-2 else "FAIL (bf16 tol 2e-2)")
            rows.append((f"max rel err {k}", v, ok))
    for b in batches:
        row = get("decode_8b", "batches", str(b), default={})
        target = ""
        if b == 1 and "fraction_of_roofline" in row:
            target = "ok" if row["fraction_of_roofline"] >= 0.85 else "below 0.85 target"
        rows.append((f"8B decode tok/s, batch {b}", row.get("decode_tok_s", "-"), target))
        if b == 1:
            rows.append(("8B batch-1 fraction of roofline", row.get("fraction_of_roofline", "-"), ""))
    for b in base_batches:
        ours = get("decode_8b", "batches", str(b), "e2e_tok_s")
        theirs = get("transformers_8b", "batches", str(b), "e2e_tok_s")
        ratio = round(ours / theirs, 2) if isinstance(ours, float) and isinstance(theirs, float) else "-"
        r.setdefault("ratio_vs_transformers", {})[str(b)] = ratio
        target = ""
        if b == max(base_batches) and isinstance(ratio, float):
            target = "ok" if ratio >= 10 else "below 10x target"
        rows.append((f"8B generate tok/s batch {b}: kvserve / transformers", f"{ours} / {theirs} = {ratio}x", target))
    rows.append(("Qwen3-0.6B shape throughput, output tok/s", get("throughput_qwen3", "output_tok_s"), ""))
    rows.append(("Qwen3-0.6B shape throughput, total tok/s", get("throughput_qwen3", "total_tok_s"), ""))
    for sec in ("decode_8b", "throughput_qwen3"):
        cap = get(sec, "capture_s", default=None)
        used = get(sec, "cuda_graphs", default=False)
        rows.append((f"CUDA graphs ({sec}), capture s", f"{used}, {cap}",
                     "" if cap is None else ("ok" if cap < 30 else "above 30 s target")))
    rows.append(("total seconds", r.get("total_s"), "< 480"))
    width = max(len(a) for a, _, _ in rows)
    print()
    for a, b, c in rows:
        print(f"{a:<{width}}  {b!s:<32} {c}")
    print()


if __name__ == "__main__":
    main()

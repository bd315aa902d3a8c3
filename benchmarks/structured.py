"""Structured outputs: constrained vs unconstrained decoding on the same prompts, at batch 1 and 16.

Each request asks (through the chat template) for one of tests/helpers_schemas.py's JSON schemas.
The constrained run goes first, greedy, under the schema; the unconstrained baseline then runs the
same prompts with max_tokens = each constrained output's length and ignore_eos, so both decode the
same number of tokens per request. Figures per batch size: output tok/s, TPOT (mean over requests
of (e2e - ttft) / (tokens - 1)), mask time per constrained token (the sampler's own counter), the
share of constrained outputs that validate (jsonschema), and the TPOT overhead; then the constrained
requests again without jump-forward decoding (the engine's default appends the tokens a grammar forces
without a step of their own): its tok/s, whether the tokens are the same, and the speed-up; once: the
tokenizer view's build time, first compile of each schema and a cached compile.

Prints one JSON line last. Usage:
    python benchmarks/structured.py [--batch-sizes 1,16] [--num-prompts 32] [--max-tokens 96]
    python benchmarks/structured.py --tiny      # dry run: tiny random Llama, a few seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers_schemas import SCHEMAS  # noqa: E402


def _tpot(outs) -> float:
    per = [(o.metrics.finish_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
           for o in outs if len(o.outputs[0].token_ids) > 1]
    return statistics.mean(per) if per else float("nan")


def _run(llm, prompts, params, batch: int):
    """Run in waves of `batch` requests (batch 1: one at a time); (outputs, seconds)."""
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], params[i:i + batch], use_tqdm=False)
    return outs, time.perf_counter() - t0


def _valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def compile_figures(llm, schemas) -> dict:
    from kvserve.sampling_params import StructuredOutputsParams
    from kvserve.structured import GrammarBackend

    eng = llm.engine
    t0 = time.perf_counter()
    backend = GrammarBackend(eng.tokenizer, eng.lm.config.vocab_size)
    view_s = time.perf_counter() - t0
    first, cached = [], []
    for s in schemas:
        spec = StructuredOutputsParams(json=s)
        t0 = time.perf_counter()
        backend.compile(spec)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        backend.compile(spec)
        cached.append(time.perf_counter() - t0)
    return {"tokenizer_view_s": round(view_s, 3), "compile_first_ms_mean": round(1e3 * statistics.mean(first), 3),
            "compile_first_ms_max": round(1e3 * max(first), 3),
            "compile_cached_ms_mean": round(1e3 * statistics.mean(cached), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--kv-cache-memory", default="512MiB")
    ap.add_argument("--tiny", "--dry-run", action="store_true", help="a tiny random Llama (checks the script runs)")
    args = ap.parse_args()

    from kvserve import LLM, SamplingParams, StructuredOutputsParams
    from kvserve.bench.offline import StepCount

    if args.tiny:
        from helpers import make_tiny_hf

        model = str(make_tiny_hf(Path(tempfile.mkdtemp(prefix="kvserve-structured-")), "llama",
                                 max_position_embeddings=1024))
        args.num_prompts, args.max_tokens = min(args.num_prompts, 4), min(args.max_tokens, 24)
        args.batch_sizes = "1,2"
    else:
        model = args.model
    llm = LLM(model, kv_cache_memory=args.kv_cache_memory)
    tok = llm.engine.tokenizer
    work = [SCHEMAS[i % len(SCHEMAS)] for i in range(args.num_prompts)]
    if tok.chat_template and not args.tiny:
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Give me {what} as JSON."}], tokenize=True)
                   for what, _ in work]
    else:
        prompts = [tok.encode(f"json {i}:") for i in range(len(work))]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up

    result: dict = {"model": str(model or "default"), "num_prompts": len(work), "max_tokens": args.max_tokens,
                    "compile": compile_figures(llm, [s for _, s in SCHEMAS])}
    sampler = llm.engine.runner.sampler
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cons = [SamplingParams(temperature=0, max_tokens=args.max_tokens,
                               structured_outputs=StructuredOutputsParams(json=s)) for _, s in work]
        m0, r0 = sampler.grammar_mask_s, sampler.grammar_mask_rows
        count = StepCount(llm)  # steps and tokens of the constrained run, for its roofline line
        c_outs, c_s = _run(llm, prompts, cons, batch)
        llm.engine.step_observers.remove(count)
        mask_s, mask_rows = sampler.grammar_mask_s - m0, sampler.grammar_mask_rows - r0
        lens = [len(o.outputs[0].token_ids) for o in c_outs]
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
        f_outs, f_s = _run(llm, prompts, free, batch)
        n_tok = sum(lens)
        valid = sum(_valid(o.outputs[0].text, s) for o, (_, s) in zip(c_outs, work))
        c_tpot, f_tpot = _tpot(c_outs), _tpot(f_outs)
        fig = {"constrained": {"output_tok_s": round(n_tok / c_s, 1), "tpot_ms": round(1e3 * c_tpot, 2),
                               "mask_ms_per_token": round(1e3 * mask_s / max(mask_rows, 1), 4),
                               "valid": f"{valid}/{len(work)}",
                               "finished_stop": sum(o.outputs[0].finish_reason == "stop" for o in c_outs)},
               "unconstrained": {"output_tok_s": round(n_tok / f_s, 1), "tpot_ms": round(1e3 * f_tpot, 2)},
               "tpot_overhead_perc": round(100 * (c_tpot / f_tpot - 1), 1)}
        # the same constrained requests without jump-forward (each forced token a step of its own)
        llm.engine.scheduler.jump_forward = False
        n_outs, n_s = _run(llm, prompts, cons, batch)
        llm.engine.scheduler.jump_forward = True
        fig["constrained_no_jump_forward"] = {"output_tok_s": round(n_tok / n_s, 1),
                                              "tpot_ms": round(1e3 * _tpot(n_outs), 2),
                                              "same_tokens": [o.outputs[0].token_ids for o in n_outs]
                                              == [o.outputs[0].token_ids for o in c_outs]}
        fig["jump_forward_speedup"] = round(n_s / c_s, 3)
        fig["constrained"]["roofline"] = count.roofline(c_s)[0]
        result[f"batch_{batch}"] = fig
        print(f"batch {batch}:", fig, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

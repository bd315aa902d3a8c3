"""Speculative decoding methods vs none, in one run: decode tok/s, speed-up, acceptance, mean accepted length.

Workloads: input-grounded requests (copy / edit a paragraph of text or a file of this repo, where the
answer repeats spans of the prompt) and open chat prompts; batch 1 and 16; greedy (temperature 0) and,
with --temperatures 0,0.8, seeded sampling; outputs must be identical to decoding without speculation in
both (checked). Each case runs the engine without speculation and once per --methods entry:

    ngram             prompt lookup, adaptive draft lengths (ngram_fixed: "adaptive": false; any method
                      takes the _fixed suffix)
    draft_model       --draft-model as the draft (default: the default model's own Q4_1 GGUF, on the
                      native path: the float32 target's int4 draft as a separate checkpoint)
    self_quant        the target's own weights quantized (a float target: --quantization none)
    self_quant_skip   the same, only its first --draft-layers layers (a layer-skip self-draft)

With --vs-llamacpp DIR (a llama.cpp build's bin/ holding llama-lookup and llama-speculative, built from
the same source as the CPU benchmarks), batch 1 greedy runs the same prompts (as text) through llama.cpp's
own prompt lookup (llama-lookup, --spec-draft-n-max k vs 0) and, for a float target, its draft-model
decoding (llama-speculative, the draft's GGUF as -md), on the same weights: a float target is the GGUF
written as F32 by llama.cpp's own quantizer, which is what --quantization none decodes it to.

Decode time is wall-clock by default; --clock cpu reads the process's CPU seconds instead, which a busy
shared core inflates far less (with one thread both agree on an idle core); the JSON has both. Prints
one line per case, then one JSON line.

    python benchmarks/spec_decode.py [--num-speculative-tokens 4] [--max-tokens 128] [--batch-sizes 1,16]
    python benchmarks/spec_decode.py --quantization none --methods ngram,draft_model,self_quant,self_quant_skip
    python benchmarks/spec_decode.py --quantization none --methods ngram,draft_model --vs-llamacpp /path/to/llama.cpp/build/bin
    python benchmarks/spec_decode.py --tiny     # dry run: a tiny random model, a few tokens, no timings worth reading
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# sixteen different questions (four repeated four times made batch 16 four groups of identical requests,
# which finish together and draft alike)
CHAT = ["What are three good habits for writing readable code?", "Explain what a hash table is to a child.",
        "Give me a short plan for learning to cook.", "Why is the sky blue?",
        "What should I pack for a weekend hiking trip?", "How do vaccines train the immune system?",
        "Write a short poem about autumn leaves.", "What is the difference between weather and climate?",
        "Suggest three names for a friendly robot.", "How does a bicycle stay upright?",
        "Give me tips for a job interview.", "Why do cats purr?",
        "Describe how bread rises.", "What are the planets of the solar system?",
        "How can I save money on groceries?", "Tell me a fun fact about octopuses."]


def grounded_prompts(n: int, chars: int = 1200) -> list[str]:
    """Copy-or-edit requests built from files in the repo: the answer copies spans of the prompt."""
    files = sorted((ROOT / "kvserve" / "engine").glob("*.py")) + [ROOT / "README.md"]
    files = [f for f in files if f.stat().st_size >= chars]  # an empty __init__.py gave a prompt with nothing to copy
    out = []
    for i in range(n):
        text = files[i % len(files)].read_text()
        start = (i * 997) % max(1, len(text) - chars)
        chunk = text[start : start + chars]
        task = ("Rewrite this code with the same behaviour, keeping every line:" if files[i % len(files)].suffix
                == ".py" else "Repeat the following text exactly:")
        out.append(f"{task}\n\n{chunk}\n\nAnswer:\n\n{chunk[:80]}")
    return out


def chat_prompts(tok, tokenize: bool) -> list:  # noqa: ANN001 - the model's tokenizer
    """The open chat prompts in the model's chat template: token ids (kvserve) or text (llama.cpp's tools)."""
    return [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=tokenize, add_generation_prompt=True)
            if getattr(tok, "chat_template", None) else c for c in CHAT]


def run(loaded, prompts: list[str], spec: dict | None, batch: int, temperature: float, args) -> dict:
    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine

    eng = LLMEngine(loaded=loaded, kv_cache_memory=args.kv_cache_memory, max_num_seqs=batch,
                    speculative_config=spec)
    params = SamplingParams(temperature=temperature, seed=0 if temperature else None, max_tokens=args.max_tokens,
                            ignore_eos=True)
    eng.add_request("warm", prompts[0][:40], SamplingParams(max_tokens=2))
    while eng.has_unfinished_requests():
        eng.step()
    for i, p in enumerate(prompts):
        eng.add_request(f"q{i}", p, params)
    outs: dict[str, list[int]] = {}
    decode_s, decode_steps, decode_positions = {"wall": 0.0, "cpu": 0.0}, [0], [0]
    decode = [False]

    def observe(so, dt: float) -> None:  # noqa: ANN001 - a SchedulerOutput
        # a decode step: no scheduled request computed a prompt token (a draft model's own catch-up on a
        # prompt runs inside decode steps, and counts there)
        decode[0] = bool(so.scheduled) and all(s.start >= s.request.num_prompt_tokens - 1 for s in so.scheduled)
        if decode[0]:
            decode_steps[0] += 1
            decode_positions[0] += so.total_num_tokens  # verify rows included: what the step computed

    eng.step_observers.append(observe)
    while eng.has_unfinished_requests():
        t0, c0 = time.perf_counter(), time.process_time()
        finished = [o for o in eng.step() if o.finished]
        if decode[0]:
            decode_s["wall"] += time.perf_counter() - t0
            decode_s["cpu"] += time.process_time() - c0
        for o in finished:
            outs[o.request_id] = o.outputs[0].token_ids
    st = eng.stats()
    from kvserve import roofline

    lm = eng.lm  # decode steps against the machine's peaks: each streams every weight once
    secs = decode_s[args.clock]
    line = roofline.line(roofline.cached(eng.device), lm.weight_bytes * decode_steps[0] / max(secs, 1e-9),
                         2 * lm.num_params * decode_positions[0] / max(secs, 1e-9))
    total = sum(len(t) for t in outs.values())
    n_decoded = total - len(prompts)  # each request's first token comes with its prompt's last chunk
    rate = {c: round(n_decoded / t, 2) if t else None for c, t in decode_s.items()}
    return {"tokens": [outs[f"q{i}"] for i in range(len(prompts))], "output_tokens": total,
            "decode_tok_s": rate[args.clock], "decode_tok_s_wall": rate["wall"], "decode_tok_s_cpu": rate["cpu"],
            "acceptance_rate": round(st["spec_decode_acceptance_rate"], 3),
            "mean_accepted_length": round(st["spec_decode_mean_accepted_length"], 3),
            "drafted": st["spec_decode_num_draft_tokens"], "accepted": st["spec_decode_num_accepted_tokens"],
            "roofline": line}


def method_config(name: str, args, tiny_path: Path | None) -> dict:  # noqa: ANN001 - argparse args
    """The speculative_config of a --methods entry (a _fixed suffix: "adaptive": false)."""
    base, fixed = name.removesuffix("_fixed"), name.endswith("_fixed")
    k = {"num_speculative_tokens": args.num_speculative_tokens}
    if base == "ngram":
        cfg = {"method": "ngram", **k, "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": 1}
    elif base == "draft_model":
        from kvserve.loader import default_model_path

        model = args.draft_model or str(tiny_path or default_model_path())
        cfg = {"method": "draft_model", **k, "model": model}
        if tiny_path is not None:
            cfg["quantization"] = "int8"
    elif base == "self_quant":
        cfg = {"method": "self_quant", **k}
    elif base == "self_quant_skip":
        cfg = {"method": "self_quant", **k, "draft_layers": args.draft_layers}
    else:
        raise SystemExit(f"unknown method {name!r} (ngram, draft_model, self_quant, self_quant_skip, each with _fixed)")
    return {**cfg, "adaptive": False} if fixed else cfg


LLAMACPP_FIGURES = {"tokens": r"decoded\s+(\d+) tokens", "seconds": r"decoded\s+\d+ tokens in\s+([\d.]+) seconds",
                    "drafted": r"n_drafted\s*=\s*(\d+)", "accepted": r"n_accept\s*=\s*(\d+)"}


def llamacpp_run(cmd: list[str]) -> dict:
    """One llama-lookup / llama-speculative run: the figures it prints at the end."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    log = out.stdout + out.stderr
    return {k: float(m.group(1)) if (m := re.search(rx, log)) else 0.0 for k, rx in LLAMACPP_FIGURES.items()}


def vs_llamacpp(bin_dir: Path, target: Path, draft: Path | None, texts: list[str], args) -> dict:  # noqa: ANN001
    """llama.cpp at batch 1, greedy, on the same prompts: none, its prompt lookup and (with a draft) its
    draft-model decoding, alternating over --reps; the median by decode rate of each, summed over prompts."""
    k, threads = str(args.num_speculative_tokens), str(args.threads or 2)
    common = ["-m", str(target), "-n", str(args.max_tokens), "-t", threads, "-c", "4096", "--temp", "0", "--ignore-eos"]
    cases = {"none": [str(bin_dir / "llama-lookup"), "--spec-draft-n-max", "0"],
             "lookup": [str(bin_dir / "llama-lookup"), "--spec-draft-n-max", k]}
    if draft is not None:
        cases["speculative"] = [str(bin_dir / "llama-speculative"), "-md", str(draft), "-td", threads,
                                "--spec-draft-n-max", k]
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for _ in range(max(1, args.reps)):
        for case, cmd in cases.items():
            figs = [llamacpp_run(cmd + common + ["-p", t]) for t in texts]
            tot = {key: sum(f[key] for f in figs) for key in LLAMACPP_FIGURES}
            runs[case].append({**tot, "tok_s": round(tot["tokens"] / tot["seconds"], 2) if tot["seconds"] else None})
    out = {c: median_run(r, "tok_s") for c, r in runs.items()}
    for case in cases:
        r = out[case]
        if case != "none":
            r["speedup"] = round(r["tok_s"] / out["none"]["tok_s"], 3) if r["tok_s"] and out["none"]["tok_s"] else None
            r["acceptance_rate"] = round(r["accepted"] / r["drafted"], 3) if r["drafted"] else 0.0
    return out


def llamacpp_files(args, loaded) -> tuple[Path, Path | None]:  # noqa: ANN001 - argparse args, a LoadedModel
    """The target's and the draft's GGUF for llama.cpp: a float target (--quantization none) is the GGUF
    written as F32 by llama.cpp's quantizer (the weights kvserve decodes it to), drafted by the GGUF itself."""
    from formats_vs_llamacpp import make_format

    from kvserve.loader import default_model_path

    src = Path(args.model or default_model_path())
    if src.suffix != ".gguf":
        raise SystemExit("--vs-llamacpp needs a GGUF model")
    if loaded.quantization != "none":
        return src, None
    out_dir = Path(tempfile.gettempdir()) / "kvserve-spec-llamacpp"
    return make_format(src, "F32", out_dir, args.threads or 2), Path(args.draft_model or src)


def median_run(runs: list[dict], key: str = "decode_tok_s") -> dict:
    """The run of median decode rate (the lower middle one of an even count): its other figures with it."""
    ranked = sorted(runs, key=lambda r: r[key] or 0.0)
    return ranked[(len(ranked) - 1) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M GGUF")
    ap.add_argument("--quantization", default="auto",
                    help="as the engine's flag: auto (default: the GGUF's own formats on the native CPU path), none ...")
    ap.add_argument("--methods", default="ngram_fixed,ngram",
                    help="comma-separated: ngram, draft_model, self_quant, self_quant_skip (each also with _fixed)")
    ap.add_argument("--draft-model", default=None, help="draft_model's checkpoint (default: the default model's GGUF)")
    ap.add_argument("--draft-layers", type=int, default=28, help="self_quant_skip: the draft's first N layers")
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--batch1-prompts", type=int, default=8,
                    help="batch 1: this many of the workload's prompts, one at a time (the grounded ones copy "
                         "from 1.8 to 4.9 tokens a verify: a few prompts are no sample)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--temperatures", default="0",
                    help="comma-separated temperatures; sampled requests are seeded, so their tokens are checked too")
    ap.add_argument("--workloads", default="grounded,chat")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="decode time by the wall clock, or by the process's CPU time (a shared core)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--reps", type=int, default=1,
                    help="runs of each case, alternating none and every method; the median run of each is reported "
                         "(a shared machine's speed drifts: one run of each reads +-10%% apart on the same work)")
    ap.add_argument("--vs-llamacpp", type=Path, default=None, metavar="BIN_DIR",
                    help="a llama.cpp build's bin/ (llama-lookup, llama-speculative): its batch-1 greedy rows beside")
    ap.add_argument("--tiny", "--dry-run", action="store_true", help="a tiny random model and a few tokens")
    args = ap.parse_args()

    import torch

    from kvserve.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    tiny_path = None
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import make_tiny_hf

        tiny_path = make_tiny_hf(Path(tempfile.mkdtemp(prefix="kvserve-spec-")), "llama", max_position_embeddings=1024)
        loaded = load_model(tiny_path)
        args.max_tokens, args.kv_cache_memory, args.draft_layers = 8, "32MiB", 1
        batch_sizes = [1, 2]
    else:
        loaded = load_model(args.model, quantization=args.quantization)
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m and m != "none"]
    configs = {m: method_config(m, args, tiny_path) for m in methods}
    tok = loaded.tokenizer
    workloads = {"grounded": grounded_prompts(16, 250 if args.tiny else 1200), "chat": chat_prompts(tok, True)}
    workloads = {w: workloads[w] for w in args.workloads.split(",")}
    texts = {"grounded": workloads.get("grounded"), "chat": chat_prompts(tok, False)}  # what llama.cpp is given
    llamacpp_models = llamacpp_files(args, loaded) if args.vs_llamacpp else None
    rows = []
    temperatures = [float(t) for t in args.temperatures.split(",")]
    for name, prompts in workloads.items():
        for batch in batch_sizes:
            ps = prompts[:batch] if batch > 1 else prompts[: args.batch1_prompts]
            for temperature in temperatures:
                runs: dict[str | None, list[dict]] = {None: [], **{label: [] for label in configs}}
                for _ in range(max(1, args.reps)):  # alternating, so a drift in the machine's speed hits all alike
                    runs[None].append(run(loaded, ps, None, batch, temperature, args))
                    for label, cfg in configs.items():
                        runs[label].append(run(loaded, ps, cfg, batch, temperature, args))
                base = median_run(runs[None])
                row = {"workload": name, "batch": batch, "temperature": temperature, "base_tok_s": base["decode_tok_s"],
                       "base_tok_s_wall": base["decode_tok_s_wall"], "base_tok_s_cpu": base["decode_tok_s_cpu"]}
                for label in configs:
                    sd = median_run(runs[label])
                    # greedy, or seeded sampling: the tokens of decoding without speculation. Bit for bit on the
                    # native path; on the torch path a verify step's GEMMs have more rows than a decode's, so a
                    # near tie (or a draw at a CDF boundary) may go the other way: counted, not hidden
                    same = all(r["tokens"] == base["tokens"] for r in runs[None] + runs[label])
                    diverged = sorted({next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                                       for r in runs[label] for a, b in zip(base["tokens"], r["tokens"]) if a != b})
                    if not same:
                        print(f"WARNING {name} batch {batch} T={temperature} ({label}): outputs differ from decoding "
                              f"without speculation, first at token {diverged}", flush=True)
                        if loaded.quantization != "none":
                            raise SystemExit("outputs differ on the native path, where they must not")
                    speedup = (sd["decode_tok_s"] / base["decode_tok_s"]) if base["decode_tok_s"] and \
                        sd["decode_tok_s"] else None
                    row[label] = {"tok_s": sd["decode_tok_s"], "speedup": round(speedup, 3) if speedup else None,
                                  "tok_s_wall": sd["decode_tok_s_wall"], "tok_s_cpu": sd["decode_tok_s_cpu"],
                                  "identical": same, "diverged_at": diverged, "acceptance_rate": sd["acceptance_rate"],
                                  "mean_accepted_length": sd["mean_accepted_length"], "drafted": sd["drafted"],
                                  "roofline": sd["roofline"]}
                row["base_roofline"] = base["roofline"]
                rows.append(row)
                print(f"{name:9s} batch {batch:2d} T={temperature}: none {row['base_tok_s']} tok/s; " + "; ".join(
                    f"{label} {r['tok_s']} (x{r['speedup']}, acceptance {r['acceptance_rate']}, mean accepted length "
                    f"{r['mean_accepted_length']}, drafted {r['drafted']})"
                    for label, r in ((m, row[m]) for m in configs)), flush=True)
                if llamacpp_models and batch == 1 and temperature == 0:
                    row["llamacpp"] = ll = vs_llamacpp(args.vs_llamacpp, *llamacpp_models, texts[name][: args.batch1_prompts], args)
                    print(f"{name:9s} batch  1 llama.cpp: none {ll['none']['tok_s']} tok/s; " + "; ".join(
                        f"{c} {r['tok_s']} (x{r['speedup']}, acceptance {r['acceptance_rate']}, drafted "
                        f"{int(r['drafted'])})" for c, r in ll.items() if c != "none"), flush=True)
    print(json.dumps({"benchmark": "spec_decode", "methods": configs, "k": args.num_speculative_tokens,
                      "quantization": loaded.quantization, "clock": args.clock, "threads": torch.get_num_threads(),
                      "reps": max(1, args.reps),
                      "tiny": args.tiny, "rows": rows}))


if __name__ == "__main__":
    main()

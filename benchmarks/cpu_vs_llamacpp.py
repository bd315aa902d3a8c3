"""kvserve against llama.cpp on the same GGUF, the same token ids and the same thread count.

Each repetition runs one fresh process per engine, alternating (kvserve, llama.cpp, kvserve, ...),
and every process runs the three workloads after a warm-up:
  1. decode tok/s at batch 1: a 128-token prompt, then 128 new tokens (greedy, EOS ignored);
  2. prompt tok/s: one 512-token prompt, one forward;
  3. 64 sequences x (128 prompt + 128 new): total and generated tok/s;
and reports its peak RSS. Medians and kvserve/llama.cpp ratios are printed, plus a roofline line
(weight bytes streamed per token at batch 1 against the measured memory bandwidth).

kvserve runs as installed: its default engine (no flags: `quantization` auto, float32 activations
and KV cache, the default KV budget), except that prefix caching is off, since llama.cpp keeps no
prefix across requests here; `--extra-q none int8` adds a kvserve row per explicit --quantization.
The CPU's ISA and the kernel variant kvserve picked are printed with the figures.

The llama.cpp side is llama-cpp-python (`pip install -e .[bench]`; it compiles llama.cpp, ~8 min),
driven through its low-level batch API so both engines do the same work.

    python benchmarks/cpu_vs_llamacpp.py            # default model, 2 threads, 3 repetitions
    KVSERVE_CPU_ISA=avx2 python benchmarks/cpu_vs_llamacpp.py   # kvserve's AVX2 kernels on an AVX-512 CPU
    # ... against llama.cpp built for AVX2 only: an AVX2 machine's pair on an AVX-512 CPU
    KVSERVE_CPU_ISA=avx2 python benchmarks/cpu_vs_llamacpp.py --llamacpp-path /path/to/llcpp-avx2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT1, NEW1 = 128, 128
PROMPT_LONG = 512
LIGHT_NEW = 64  # decode tokens of the light workloads
NSEQ, PROMPT_B, NEW_B = 64, 128, 128
N_CTX = NSEQ * (PROMPT_B + NEW_B) + 256  # KV room of both engines, in tokens


def token_pool(n: int) -> list[int]:
    """Real English token ids (the Python reference manual's prose), as many as asked."""
    from pydoc_data.topics import topics

    from kvserve.loader import default_model_path
    from kvserve.loader.gguf import GGUFFile
    from kvserve.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFFile(default_model_path()))
    ids = tok.encode("\n\n".join(topics.values()))
    assert len(ids) >= n
    return ids[:n]


def prompts_for(pool: list[int]) -> dict[str, list]:
    return {
        "one": pool[:PROMPT1],
        "long": pool[1000 : 1000 + PROMPT_LONG],
        "batch": [pool[5000 + i * 97 : 5000 + i * 97 + PROMPT_B] for i in range(NSEQ)],
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def workloads(run, prompts: dict[str, list], light: bool = False) -> dict:
    """The three timed workloads through one engine's `run(sequences, new) -> (to first token, total)`;
    `light` (benchmarks/contention.py): decode LIGHT_NEW tokens and the long prompt only."""
    new1 = LIGHT_NEW if light else NEW1
    run([prompts["one"][:32]], 8)  # warm-up
    first, total = run([prompts["one"]], new1)
    t_prompt, _ = run([prompts["long"]], 1)
    res = {"decode_tok_s": (new1 - 1) / (total - first), "prompt_tok_s": PROMPT_LONG / t_prompt}
    if light:
        return res
    _, t_batch = run(prompts["batch"], NEW_B)
    return {**res, "batch_total_tok_s": NSEQ * (PROMPT_B + NEW_B) / t_batch,
            "batch_gen_tok_s": NSEQ * NEW_B / t_batch, "peak_rss_mib": peak_rss_mib()}


# -- kvserve ---------------------------------------------------------------------------------


def run_kvserve(model: str, threads: int, prompts: dict[str, list], quantization: str | None,
                fixed_threads: bool = True, light: bool = False) -> dict:
    """`fixed_threads`: `threads` threads throughout (--num-threads); False: at most `threads`, fewer while
    other processes take cores (the engine's default)."""
    import torch

    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.kernels import cpu as native

    torch.set_num_threads(threads)
    flags = {} if quantization is None else {"quantization": quantization}
    eng = LLMEngine(model=model, num_threads=threads if fixed_threads else None, enable_prefix_caching=False, **flags)

    def run(batch: list[list[int]], new: int) -> tuple[float, float]:
        """Wall time to the first token of the last sequence and to the end."""
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        t0 = time.perf_counter()
        for i, p in enumerate(batch):
            eng.add_request(f"r{time.perf_counter_ns()}-{i}", p, params)
        first = None
        while eng.has_unfinished_requests():
            eng.step()
            if first is None:
                first = time.perf_counter()
        return first - t0, time.perf_counter() - t0

    return {**workloads(run, prompts, light), "weight_bytes": streamed_bytes(eng.lm.model),
            "weights": eng.lm.describe(), "kernels": native.isa() or "torch", "kv": eng.budget.describe(),
            "thread_changes": eng.thread_governor.changes if eng.thread_governor is not None else 0}


def cpu_isa() -> str:
    """The CPU's model and the SIMD extensions that matter here, from /proc/cpuinfo."""
    from kvserve.kernels.cpu.build import _cpu_flags

    name = next((line.partition(":")[2].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = _cpu_flags()
    wanted = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm", "bf16")
    return f"{name}: {' '.join(f for f in wanted if f in flags)}"


def streamed_bytes(model) -> int:
    """Weight bytes read per decoded token: every linear layer and the LM head (not the embedding
    table, of which one row is read)."""
    from kvserve.layers.linear import Linear

    total = 0
    for m in model.modules():
        if isinstance(m, Linear):
            total += m.qweight.nbytes if m.qweight is not None else m.weight.numel() * m.weight.element_size()
    return total


# -- llama.cpp -------------------------------------------------------------------------------


def run_llamacpp(model: str, threads: int, prompts: dict[str, list], light: bool = False) -> dict:
    import ctypes

    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    lm = lc.llama_model_load_from_file(model.encode(), mparams)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = N_CTX
    cparams.n_batch = 2048
    cparams.n_ubatch = 512
    cparams.n_seq_max = NSEQ
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    ctx = lc.llama_init_from_model(lm, cparams)
    vocab = lc.llama_n_vocab(lc.llama_model_get_vocab(lm))
    mem = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(2048, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> dict[int, int]:
        """items: (token, position, sequence, wants logits), split into n_batch-sized calls;
        returns the greedy next token of every sequence that asked for logits."""
        nxt = {}
        for s in range(0, len(items), 2048):
            chunk = items[s : s + 2048]
            batch.n_tokens = len(chunk)
            for i, (tok, pos, seq, logits) in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    nxt[seq] = greedy(i)
        return nxt

    def greedy(i: int) -> int:
        ptr = lc.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(vocab,)).argmax())

    def run(seqs: list[list[int]], new: int) -> tuple[float, float]:
        lc.llama_memory_clear(mem, True)
        t0 = time.perf_counter()
        nxt = decode([(t, p, s, p == len(ids) - 1) for s, ids in enumerate(seqs) for p, t in enumerate(ids)])
        first = time.perf_counter()
        lens = [len(s) for s in seqs]
        for step in range(new - 1):
            nxt = decode([(nxt[s], lens[s] + step, s, True) for s in range(len(seqs))])
        return first - t0, time.perf_counter() - t0

    info = lc.llama_print_system_info().decode()
    simd = ",".join(k.split(":")[-1].strip() for k, _, v in (p.partition("=") for p in info.split("|")) if v.strip() == "1")
    return {**workloads(run, prompts, light), "version": lc.__version__, "simd": simd}


def memory_bandwidth_gb_s() -> float:
    """Read bandwidth: sum over a 1 GiB buffer (best of 5), all threads."""
    import torch

    x = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    prompts = prompts_for(token_pool(5000 + NSEQ * 97 + PROMPT_B))
    if args.worker == "kvserve":
        res = run_kvserve(args.model, args.threads, prompts, args.quantization,
                          fixed_threads=not args.max_threads, light=args.light)
    elif args.worker == "llamacpp":
        res = run_llamacpp(args.model, args.threads, prompts, args.light)
    else:
        res = {"bandwidth_gb_s": memory_bandwidth_gb_s()}
    print("RESULT " + json.dumps(res), flush=True)


def spawn(kind: str, args: argparse.Namespace, quantization: str | None = None, flags: tuple[str, ...] = ()) -> dict:
    """One worker process (kvserve, llamacpp or bandwidth) and its RESULT; `flags`: the worker's --light,
    --max-threads."""
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--threads", str(args.threads), *flags]
    if quantization is not None:
        cmd += ["--quantization", quantization]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if kind == "llamacpp" and args.llamacpp_path:  # another llama-cpp-python build first (e.g. AVX2 only)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.llamacpp_path, env.get("PYTHONPATH")) if p)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quantization", default=None, help=argparse.SUPPRESS)  # a worker's explicit -q
    p.add_argument("--extra-q", nargs="*", default=[], help="also run kvserve with each of these --quantization")
    p.add_argument("--llamacpp-path", default=None,
                   help="a directory holding another llama-cpp-python build (pip install --target DIR ...)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--light", action="store_true", help=argparse.SUPPRESS)  # a worker's light workloads
    p.add_argument("--max-threads", action="store_true", help=argparse.SUPPRESS)  # kvserve: at most --threads
    args = p.parse_args()
    if args.model is None:
        from kvserve.loader import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        worker(args)
        return
    rows = ["kvserve", *(f"kvserve -q {q}" for q in args.extra_q)]
    runs: dict[str, list[dict]] = {"llamacpp": [], **{r: [] for r in rows}}
    for rep in range(args.reps):
        order = [*rows, "llamacpp"] if rep % 2 == 0 else ["llamacpp", *rows]
        for kind in order:
            q = kind.split(" -q ")[1] if " -q " in kind else None
            r = spawn("llamacpp" if kind == "llamacpp" else "kvserve", args, q)
            runs[kind].append(r)
            print(f"rep {rep} {kind}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items() if isinstance(v, float)),
                  flush=True)
    bw = spawn("bandwidth", args)["bandwidth_gb_s"]
    keys = ("decode_tok_s", "prompt_tok_s", "batch_total_tok_s", "batch_gen_tok_s", "peak_rss_mib")
    med = {k: {kind: statistics.median(r[k] for r in runs[kind]) for kind in runs} for k in keys}
    print(f"\nCPU: {cpu_isa()}; {args.threads} threads, {args.reps} repetitions (medians)")
    for r in rows:
        print(f"{r}: {runs[r][0]['weights']}; kernels {runs[r][0]['kernels']}")
    print(f"llama-cpp-python {runs['llamacpp'][0]['version']} ({runs['llamacpp'][0].get('simd', '?')})")
    print(f"{'':22s}" + "".join(f"{r:>22s}" for r in rows) + f"{'llama.cpp':>11s}")
    for k in keys:
        b = med[k]["llamacpp"]
        cells = "".join(f"{med[k][r]:12.1f} ({med[k][r] / b:5.2f}x)" for r in rows)
        print(f"{k:22s}{cells}{b:11.1f}")
    first = runs["kvserve"][0]
    streamed = first["weight_bytes"] * med["decode_tok_s"]["kvserve"] / 1e9
    print(f"roofline: batch-1 decode streams {streamed:.1f} GB/s of weights "
          f"({first['weight_bytes'] / 2**20:.0f} MiB per token) against {bw:.1f} GB/s measured read "
          f"bandwidth ({streamed / bw:.0%})")
    summary = {k: {**med[k], "ratio": med[k]["kvserve"] / med[k]["llamacpp"]} for k in keys}
    print(json.dumps({"cpu": cpu_isa(), "kernels": first["kernels"], "threads": args.threads, "reps": args.reps,
                      "bandwidth_gb_s": bw, **summary}))


if __name__ == "__main__":
    main()

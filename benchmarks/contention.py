"""kvserve and llama.cpp on a CPU that another program is using, against the same on a quiet machine.

A user's laptop or server runs other work beside the engine. Each engine runs in a fresh process,
alternating, twice: on a quiet machine, then with a busy loop (one Python process spinning) pinned to
the last CPU this process may use. Workloads, same GGUF and token ids as benchmarks/cpu_vs_llamacpp.py:
decode tok/s at batch 1 (a 128-token prompt, base.LIGHT_NEW = 64 new tokens) and prompt tok/s (one 512-token prompt).

Rows: kvserve as installed (at most `--threads` threads, fewer while other processes take cores:
kvserve/engine/cpu_threads.py), kvserve with the count fixed (`--num-threads`), and llama.cpp with
`n_threads` = `--threads` (llama-cpp-python, as in cpu_vs_llamacpp.py).

    python benchmarks/contention.py        # default model, 2 threads, 3 repetitions (medians)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import cpu_vs_llamacpp as base

ENGINES = ("kvserve", "kvserve fixed", "llamacpp")
FLAGS = {"kvserve": ("--light", "--max-threads"), "kvserve fixed": ("--light",), "llamacpp": ("--light",)}


def spawn(kind: str, args: argparse.Namespace) -> dict:
    return base.spawn(kind.split()[0], args, flags=FLAGS[kind])


def busy_loop(cpu: int) -> subprocess.Popen:
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    p = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    return p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--llamacpp-path", default=None,
                   help="a directory holding another llama-cpp-python build (as in cpu_vs_llamacpp.py)")
    args = p.parse_args()
    if args.model is None:
        from kvserve.loader import default_model_path

        args.model = str(default_model_path())
    runs: dict[tuple[str, str], list[dict]] = {(e, load): [] for e in ENGINES for load in ("quiet", "busy")}
    cpu = max(os.sched_getaffinity(0))
    for load in ("quiet", "busy"):
        loop = busy_loop(cpu) if load == "busy" else None
        try:
            for rep in range(args.reps):
                for kind in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
                    r = spawn(kind, args)
                    runs[kind, load].append(r)
                    changes = f", {r['thread_changes']} thread count changes" if kind == "kvserve" else ""
                    print(f"{load} rep {rep} {kind}: decode {r['decode_tok_s']:.1f} tok/s, prompt "
                          f"{r['prompt_tok_s']:.1f} tok/s{changes}", flush=True)
        finally:
            if loop is not None:
                loop.kill()
                loop.wait()
    med = {key: {k: statistics.median(r[k] for r in rs) for k in ("decode_tok_s", "prompt_tok_s")}
           for key, rs in runs.items()}
    print(f"\nCPU: {base.cpu_isa()}; at most {args.threads} threads; busy: a spinning process on CPU {cpu}; "
          f"{args.reps} repetitions (medians); kvserve kernels {runs['kvserve', 'quiet'][0]['kernels']}")
    print(f"{'':16s}{'decode quiet':>14s}{'decode busy':>14s}{'busy/quiet':>11s}{'prompt quiet':>14s}"
          f"{'prompt busy':>14s}{'busy/quiet':>11s}")
    for e in ENGINES:
        q, b = med[e, "quiet"], med[e, "busy"]
        print(f"{e:16s}{q['decode_tok_s']:14.1f}{b['decode_tok_s']:14.1f}{b['decode_tok_s'] / q['decode_tok_s']:11.2f}"
              f"{q['prompt_tok_s']:14.1f}{b['prompt_tok_s']:14.1f}{b['prompt_tok_s'] / q['prompt_tok_s']:11.2f}")
    ratios = {f"{k}_{load}": med["kvserve", load][k] / med["llamacpp", load][k]
              for k in ("decode_tok_s", "prompt_tok_s") for load in ("quiet", "busy")}
    print("kvserve / llama.cpp: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"cpu": base.cpu_isa(), "threads": args.threads, "reps": args.reps, "busy_cpu": cpu,
                      "medians": {f"{e} {load}": v for (e, load), v in med.items()}, "kvserve_vs_llamacpp": ratios}))


if __name__ == "__main__":
    main()

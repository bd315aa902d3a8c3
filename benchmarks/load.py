"""Model load time of the default model: kvserve vs transformers on the same GGUF (one run).

Prints one JSON line last. Usage: python benchmarks/load.py [--repeat 3] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from kvserve.loader import default_model_path, load_model

    import_s = time.perf_counter() - t0
    path = default_model_path()
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        lm = load_model(path)
        times.append(time.perf_counter() - t)
    print(lm.describe())
    result = {
        "model": path.name,
        "kvserve_import_s": round(import_s, 3),
        "kvserve_load_s_median": round(statistics.median(times), 3),
        "params": lm.num_params,
        "weight_mib_float32": round(lm.weight_bytes / 2**20, 1),
    }
    if not args.no_baseline:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        t = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        result["transformers_load_s"] = round(time.perf_counter() - t, 3)
        result["speedup_vs_transformers"] = round(result["transformers_load_s"] / result["kvserve_load_s_median"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

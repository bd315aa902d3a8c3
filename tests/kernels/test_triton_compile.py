"""Every Triton launch the engine can make compiles for sm_80 and sm_90 and spills no register (no GPU needed).

The launch specs are recorded from the wrappers themselves (kvserve/kernels/triton/launches.py:
the attention backend and the fused layers run on CPU tensors with the launches intercepted and
bound by Triton's own binder), so they follow every change to the wrappers' tile choices. Each
architecture compiles in its own subprocess, without TRITON_INTERPRET (which conftest.py sets for
this process), both at once. `pytest -s` prints registers, spills and shared memory per spec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the default before 3.10
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile every spec afresh: a cached kernel proves nothing
    procs = {arch: subprocess.Popen([sys.executable, "-m", "kvserve.kernels.triton.launches", "--arch", str(arch),
                                     "--json", str(out / f"sm{arch}.json")],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for arch in ARCHS}
    results = {}
    for arch, p in procs.items():
        log, _ = p.communicate(timeout=900)
        print(f"--- sm_{arch} (exit {p.returncode})\n{log}")
        path = out / f"sm{arch}.json"
        results[arch] = (p.returncode, log, json.loads(path.read_text()) if path.exists() else None)
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_compiles_without_spills(compiled, arch):
    rc, log, report = compiled[arch]
    assert report is not None, log[-4000:]
    assert not report["failures"], "\n".join(report["failures"])
    assert rc == 0, log[-4000:]
    kernels = {r["kernel"] for r in report["results"]}
    # every kernel module is covered: attention (write, decode, merge, extend) and the fused layers
    assert kernels == {"_write_kv_kernel", "_decode_kernel", "_merge_kernel", "_extend_kernel",
                       "_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel"}
    assert all(r["registers"] <= 255 and r["spill_stores"] == 0 for r in report["results"])
    tags = {t for r in report["results"] for t in r["tags"]}
    assert {"llama3-8b/bfloat16/kv=auto", "llama3-8b/bfloat16/kv=int8", "smollm2-135m/float32/kv=bfloat16",
            "smollm2-135m/bfloat16/kv=float16"} <= tags

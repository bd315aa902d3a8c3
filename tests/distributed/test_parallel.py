"""Tensor and pipeline parallelism on CPU/gloo (loopback): exactness against TP=1, failure handling.

Every parallel engine here spawns real worker processes (1 thread each). A SIGALRM guard makes a
hang fail the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from helpers import TINY_VOCAB, make_tiny_hf, random_ids, run_prefill
from kvserve import SamplingParams
from kvserve.distributed.executor import WorkerDiedError
from kvserve.distributed.parallel_state import split_heads, stage_layers
from kvserve.engine.llm_engine import LLMEngine
from kvserve.entrypoints.llm import LLM
from kvserve.errors import InvalidRequestError
from kvserve.layers.linear import Linear
from kvserve.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# Logits are asserted within 1e-4 of TP=1, so a greedy choice more than 2e-4 ahead of the runner-up
# cannot flip; closer ones (near-ties of the random tiny model) could, on summation order alone.
MARGIN = 2e-4


@contextmanager
def deadline(seconds: int):
    """Fail (not hang) when the block takes longer than `seconds`."""
    def boom(*_):  # noqa: ANN002
        raise TimeoutError(f"no result within {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def odd_path(tmp_path_factory):
    """One KV head (replicated over TP ranks), tied embeddings (the last stage keeps the embedding), q/k/v bias."""
    return make_tiny_hf(tmp_path_factory.mktemp("odd"), "qwen2", num_key_value_heads=1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)  # the 64-prompt invariance workload of test_engine.py
    return [random_ids(int(n), TINY_VOCAB, seed=i) for i, n in enumerate(rng.integers(1, 60, size=64))]


def _llm(**kw) -> LLM:
    kw.setdefault("kv_cache_memory", "4MiB")
    return LLM(**kw)


def _reference(path, prompts):
    """TP=1 greedy tokens, and each prompt's smallest top-1 vs top-2 logprob margin along the way."""
    llm = _llm(loaded=load_model(path))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
    toks = [o.outputs[0].token_ids for o in outs]
    margins = [min(lp.top[0][1] - lp.top[1][1] for lp in o.outputs[0].logprobs) for o in outs]
    return toks, margins


@pytest.fixture(scope="module")
def reference(tiny_path, prompts):
    return _reference(tiny_path, prompts)


def test_partition_helpers():
    assert [stage_layers(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [stage_layers(4, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_heads(8, 8, 2, 1) == (4, 4, 4)
    assert [split_heads(8, 2, 4, r) for r in range(4)] == [(2, 1, 0), (2, 1, 0), (2, 1, 1), (2, 1, 1)]


@pytest.mark.parametrize("kw, match", [
    (dict(tensor_parallel_size=3), "does not divide the model's 4 attention heads"),
    (dict(pipeline_parallel_size=3), "exceeds the model's 2 layers"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an integer >= 1"),
    (dict(tensor_parallel_size=2, nnodes=3), "multiple of nnodes"),
])
def test_bad_parallel_sizes_fail_before_spawning(tiny_path, kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        LLMEngine(model=str(tiny_path), kv_cache_memory="1MiB", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_equals_tp1(tiny_path, prompts, reference, tp, pp):
    """Logits within 1e-4 of TP=1 (float32) and the same greedy tokens on the 64-prompt workload."""
    ref_toks, margins = reference
    safe = [i for i, m in enumerate(margins) if m > MARGIN]
    assert len(safe) >= 56, f"only {len(safe)} prompts have a clear greedy margin"
    seqs = prompts[:8]
    want = run_prefill(load_model(tiny_path).model, seqs)
    with deadline(240):
        llm = _llm(model=str(tiny_path), tensor_parallel_size=tp, pipeline_parallel_size=pp)
        try:
            got = llm.engine.runner.prefill_logits(seqs)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            toks = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            assert [toks[i] for i in safe] == [ref_toks[i] for i in safe]
            if pp > 1:  # micro-batches really overlapped
                assert llm.engine.pipeline_stats()["pipeline_in_flight_mean"] > 1.5
            llm.engine.kv.check_invariants()
            assert llm.engine.kv.pool.num_used_blocks == 0
        finally:
            llm.engine.shutdown()


@pytest.mark.slow
def test_replicated_kv_heads_tied_embeddings_tp2xpp2(odd_path, prompts):
    """1 KV head over 2 TP ranks, tied LM head on the last stage, q/k/v bias sharded."""
    ref_toks, margins = _reference(odd_path, prompts[:16])
    want = run_prefill(load_model(odd_path).model, prompts[:4])
    with deadline(240):
        llm = _llm(model=str(odd_path), tensor_parallel_size=2, pipeline_parallel_size=2)
        try:
            for a, b in zip(llm.engine.runner.prefill_logits(prompts[:4]), want):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            toks = [o.outputs[0].token_ids for o in llm.generate(prompts[:16], GREEDY, use_tqdm=False)]
            safe = [i for i, m in enumerate(margins) if m > MARGIN]
            assert len(safe) >= 12 and [toks[i] for i in safe] == [ref_toks[i] for i in safe]
        finally:
            llm.engine.shutdown()


@pytest.mark.slow
def test_int8_weights_shard_too(tiny_path, prompts):
    """W8A8 on sharded weights: each rank quantizes its slice (scales differ from TP=1, so agreement, not identity)."""
    ref = _llm(loaded=load_model(tiny_path, quantization="int8"))
    want = [o.outputs[0].token_ids for o in ref.generate(prompts[:16], GREEDY, use_tqdm=False)]
    with deadline(240):
        llm = _llm(model=str(tiny_path), tensor_parallel_size=2, quantization="int8")
        try:
            assert llm.engine.lm.quantization == "int8"
            assert all(m.qweight is not None for m in llm.engine.lm.model.modules() if isinstance(m, Linear))
            got = [o.outputs[0].token_ids for o in llm.generate(prompts[:16], GREEDY, use_tqdm=False)]
        finally:
            llm.engine.shutdown()
    same = sum(a[:4] == b[:4] for a, b in zip(got, want))
    assert same >= 12, f"only {same}/16 int8 TP=2 continuations start like int8 TP=1's"


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_killed_worker_fails_fast(tiny_path, prompts, tp, pp):
    """SIGKILL a worker mid-run: the engine raises WorkerDiedError naming it, well within the timeout."""
    with deadline(120):
        llm = _llm(model=str(tiny_path), tensor_parallel_size=tp, pipeline_parallel_size=pp,
                   distributed_timeout=30)
        ex = llm.engine.executor
        (rank, proc), = ex.procs
        killer = threading.Timer(1.0, os.kill, (proc.pid, signal.SIGKILL))
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        t0 = time.time()
        killer.start()
        with pytest.raises(WorkerDiedError, match=f"rank {rank}"):
            for _ in range(1000):  # keep the engine busy until the kill lands
                llm.generate(prompts[:8], long, use_tqdm=False)
        assert time.time() - t0 < 20
        with pytest.raises(WorkerDiedError):  # stays failed, and says so at once
            llm.engine.check_health()
        llm.engine.shutdown()  # no hang, nothing left running
        assert not proc.is_alive()


@pytest.mark.slow
def test_hung_worker_is_caught_by_its_heartbeat(tiny_path, prompts):
    """SIGSTOP a worker mid-run: no socket closes, so only the heartbeat can tell; the engine raises
    WorkerDiedError saying so within a few seconds, not at the 60 s collective timeout."""
    with deadline(120):
        llm = _llm(model=str(tiny_path), tensor_parallel_size=2, distributed_timeout=60,
                   worker_heartbeat_timeout=2)
        (rank, proc), = llm.engine.executor.procs
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stopped: list[float] = []

        def stop() -> None:
            os.kill(proc.pid, signal.SIGSTOP)
            stopped.append(time.time())

        threading.Timer(1.0, stop).start()
        try:
            with pytest.raises(WorkerDiedError, match=f"rank {rank} .*no heartbeat"):
                for _ in range(1000):
                    llm.generate(prompts[:8], long, use_tqdm=False)
            assert stopped and time.time() - stopped[0] < 2 + 8  # the timeout, a beat and slack; not 60
        finally:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        llm.engine.shutdown()
        assert not proc.is_alive()


@pytest.mark.slow
def test_dead_worker_stops_async_engine(tiny_path):
    """An idle server's engine notices a dead worker: alive turns False (the server's /health answers 503)."""
    from kvserve.engine.async_engine import AsyncLLMEngine

    with deadline(120):
        eng = LLMEngine(model=str(tiny_path), kv_cache_memory="1MiB", tensor_parallel_size=2)
        ae = AsyncLLMEngine(eng)
        assert ae.alive
        (_, proc), = eng.executor.procs
        proc.kill()
        t0 = time.time()
        while ae.alive and time.time() - t0 < 10:
            time.sleep(0.05)
        assert not ae.alive and isinstance(ae.error, WorkerDiedError)
        ae.shutdown()


def test_prefix_router():
    from kvserve.distributed.data_parallel import PrefixRouter

    r = PrefixRouter(2, block_size=4, capacity_blocks=100)
    a = list(range(20))
    first = r.route(a)
    r.load[first] += 1  # still running
    assert r.route(a[:12] + [99, 98, 97]) == first  # shares 3 full blocks with a
    other = r.route([50 + i for i in range(20)])  # nothing cached anywhere: least loaded
    assert other != first
    assert r.prefix_routed[first] == 1 and r.routed[first] == 2 and r.routed[other] == 1
    assert r.route([7]) in (0, 1)  # shorter than a block: no hashes, still routed
    small = PrefixRouter(2, block_size=4, capacity_blocks=2)  # the record is an LRU bounded by the cache
    small.route(a)
    assert max(len(rec) for rec in small.records) == 2
    rr = PrefixRouter(3, 4, 10, policy="round_robin")
    assert [rr.route(a) for _ in range(4)] == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="routing policy"):
        PrefixRouter(2, 4, 10, policy="random")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_node_flags_and_torchrun_env(tiny_path):
    """`--nnodes 2 --node-rank k` (one process per "node") and torchrun's env, on loopback: same text as TP=1."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "kvserve.entrypoints.cli", "generate", "--model", str(tiny_path),
            "--kv-cache-memory", "1MiB", "--max-tokens", "8", "--ignore-eos"]
    ref = subprocess.run(base + ["hello there"], capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    nodes = ["-tp", "2", "--nnodes", "2", "--distributed-init-method", f"tcp://127.0.0.1:{_free_port()}"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    for worker_cmd, worker_env, engine_cmd, engine_env in [
        (base + nodes + ["--node-rank", "1", "hello there"], None, base + nodes + ["hello there"], None),
        (base + ["-tp", "2", "hello there"], {**env, "RANK": "1"}, base + ["-tp", "2", "hello there"],
         {**env, "RANK": "0"}),
    ]:
        # with Popen as: on leaving, the worker's pipe is closed and the process reaped whatever happens (a
        # worker left running or an unclosed pipe failed this test's teardown once)
        with subprocess.Popen(worker_cmd, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as worker:
            try:
                engine = subprocess.run(engine_cmd, env=engine_env, capture_output=True, text=True, timeout=120)
                assert engine.returncode == 0, engine.stderr
                assert engine.stdout == ref.stdout
                out, _ = worker.communicate(timeout=60)  # reads the pipe while waiting: a full pipe cannot block it
                assert worker.returncode == 0, out
            finally:
                if worker.poll() is None:
                    worker.kill()  # Popen's exit then waits for it


def test_shard_loaders_read_each_rank_its_slice(tiny_path):
    """TP rank 1 of 2, built in this process: every weight is the right slice of the full one."""
    from kvserve.distributed import parallel_state as ps

    full = load_model(tiny_path).model
    ps.set_state_for_build(tp_size=2, tp_rank=1)
    try:
        shard = load_model(tiny_path).model  # a safetensors dir under TP: read lazily, slice by slice
    finally:
        ps.set_current(None)
    f, s = full.model.layers[1], shard.model.layers[1]
    fq, fk, fv = f.self_attn.qkv_proj.weight.split([64, 32, 32])  # 4 heads, 2 KV heads, head_dim 16
    torch.testing.assert_close(s.self_attn.qkv_proj.weight, torch.cat([fq[32:], fk[16:], fv[16:]]), rtol=0, atol=0)
    torch.testing.assert_close(s.self_attn.o_proj.weight, f.self_attn.o_proj.weight[:, 32:], rtol=0, atol=0)
    fg, fu = f.mlp.gate_up_proj.weight.split([96, 96])
    torch.testing.assert_close(s.mlp.gate_up_proj.weight, torch.cat([fg[48:], fu[48:]]), rtol=0, atol=0)
    torch.testing.assert_close(s.mlp.down_proj.weight, f.mlp.down_proj.weight[:, 48:], rtol=0, atol=0)
    torch.testing.assert_close(shard.model.embed_tokens.weight, full.model.embed_tokens.weight[160:], rtol=0, atol=0)
    torch.testing.assert_close(shard.lm_head.weight, full.lm_head.weight[160:], rtol=0, atol=0)
    assert shard.num_local_kv_heads == 1 and shard.num_local_layers == 2
    ps.set_state_for_build(pp_size=2, pp_rank=1)  # the last stage: layer 1, the norm and the LM head, no embedding
    try:
        stage = load_model(tiny_path).model
    finally:
        ps.set_current(None)
    assert stage.num_local_layers == 1 and isinstance(stage.model.layers[0], torch.nn.Identity)
    assert not any(n.startswith("model.embed_tokens") for n, _ in stage.named_parameters())
    torch.testing.assert_close(stage.model.layers[1].mlp.down_proj.weight, f.mlp.down_proj.weight, rtol=0, atol=0)


@pytest.mark.slow
def test_failed_start_leaves_no_workers(tiny_path):
    import multiprocessing

    with deadline(60), pytest.raises(InvalidRequestError, match="holds no block"):
        LLMEngine(model=str(tiny_path), kv_cache_memory=10, tensor_parallel_size=2)
    assert not multiprocessing.active_children()

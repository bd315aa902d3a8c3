"""The `kvserve` flags come from EngineConfig's fields; EngineConfig.resolve()/from_kwargs; simulate's KV size."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from helpers import make_tiny_hf, write_tiny_llama_gguf
from kvserve import config as C
from kvserve.config import EngineConfig
from kvserve.entrypoints.cli import build_parser, engine_fields, engine_kwargs, main
from kvserve.errors import InvalidRequestError


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _actions(name: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in _subparser(name)._actions}


# -- flags from the config ---------------------------------------------------------------------


def test_every_flag_field_is_a_serve_flag_with_its_default():
    acts = _actions("serve")
    args = build_parser().parse_args(["serve"])
    flags = engine_fields()
    assert {f.name for f in flags} == {f.name for f in dataclasses.fields(EngineConfig)} - {"seed"}
    for f in flags:
        assert f"--{f.name.replace('_', '-')}" in acts[f.name].option_strings, f.name
        assert getattr(args, f.name) == f.default, f.name
        assert acts[f.name].help == f.metadata["help"], f.name
    # the spellings users have today
    assert "--no-enable-prefix-caching" in acts["enable_prefix_caching"].option_strings
    assert isinstance(acts["enforce_eager"], argparse._StoreTrueAction)
    assert "-q" in acts["quantization"].option_strings
    assert "-tp" in acts["tensor_parallel_size"].option_strings
    assert "-pp" in acts["pipeline_parallel_size"].option_strings
    assert acts["max_num_seqs"].type is int and acts["gpu_memory_utilization"].type is float
    assert acts["kv_cache_memory"].type is None and acts["model"].type is None  # strings


def test_choices_come_from_the_config_constants():
    from kvserve.engine import policy
    from kvserve.layers import attention
    from kvserve.quant import int8

    expected = {"dtype": C.DTYPES, "quantization": C.QUANTIZATIONS, "kv_cache_dtype": C.KV_CACHE_DTYPES,
                "preemption_mode": C.PREEMPTION_MODES, "scheduling_policy": C.SCHEDULING_POLICIES,
                "attention_backend": C.ATTENTION_BACKENDS}
    for cmd in ("generate", "chat", "serve", "simulate"):
        acts = _actions(cmd)
        for name, choices in expected.items():
            assert acts[name].choices is choices, (cmd, name)
    assert policy.POLICIES is C.SCHEDULING_POLICIES and attention.ATTENTION_BACKENDS is C.ATTENTION_BACKENDS
    assert int8.QUANTIZATION_METHODS is C.QUANTIZATIONS


def test_engine_kwargs_from_flags():
    kw = engine_kwargs(build_parser().parse_args(["serve", "--max-num-seqs", "7", "--no-enable-prefix-caching"]))
    assert kw["max_num_seqs"] == 7 and kw["enable_prefix_caching"] is False
    assert set(kw) == {f.name for f in engine_fields()}
    kw = engine_kwargs(build_parser().parse_args(["generate", "hi", "-q", "int8", "-tp", "2", "--enforce-eager",
                                                  "--dtype", "bf16", "--kv-cache-memory", "2GiB"]))
    assert (kw["quantization"], kw["tensor_parallel_size"], kw["enforce_eager"]) == ("int8", 2, True)
    assert kw["dtype"] == "bfloat16" and kw["kv_cache_memory"] == "2GiB"  # an alias as the loader spells it
    # simulate has no parallel group: its own --tensor-parallel-size sizes the roofline, not the engine
    kw = engine_kwargs(build_parser().parse_args(["simulate", "--tensor-parallel-size", "4"]))
    assert set(kw) == {f.name for f in engine_fields("engine")}
    EngineConfig.from_kwargs(**kw).resolve()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "float8"])


# -- resolve() / from_kwargs -----------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype must be one of auto, float32, bfloat16, float16, int8, got 'fp8'"),
    (dict(scheduling_policy="random"), "scheduling_policy must be one of fcfs, priority, lpf, mlfq, got 'random'"),
    (dict(swap_space="lots"), "swap_space: cannot parse 'lots'"),
    (dict(kv_cache_memory="2XiB"), "kv_cache_memory: cannot parse '2XiB'"),
    (dict(kv_cache_memory=0), "kv_cache_memory must be a byte size >= 1, got 0"),
    (dict(swap_space="-1GiB"), "swap_space must be a byte size >= 0, got '-1GiB'"),
    (dict(max_model_len=-1), "max_model_len must be an integer >= 0 or None, got -1"),
    (dict(scheduling_max_wait=0), r"scheduling_max_wait must be a number > 0 or None, got 0"),
    (dict(quantization="int3"), "quantization must be one of auto, none, gguf, int8, int4, got 'int3'"),
    (dict(preemption_mode="drop"), "preemption_mode must be one of recompute, swap, auto, got 'drop'"),
    (dict(attention_backend="flash"), "attention_backend must be one of auto, torch, cpu, triton, got 'flash'"),
    (dict(block_size=0), "block_size must be an integer >= 1, got 0"),
    (dict(max_num_seqs=-1), "max_num_seqs must be an integer >= 1, got -1"),
    (dict(max_num_batched_tokens=2.5), "max_num_batched_tokens must be an integer >= 1"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be a number in \(0, 1\], got 1.5"),
    (dict(cpu_memory_utilization=0), r"cpu_memory_utilization must be a number in \(0, 1\], got 0"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an integer >= 1, got 0"),
    (dict(pipeline_parallel_size=0), "pipeline_parallel_size must be an integer >= 1, got 0"),
    (dict(node_rank=2, nnodes=2), r"node_rank must be in \[0, 2\)"),
    (dict(worker_heartbeat_timeout=-1), r"worker_heartbeat_timeout must be a number of seconds >= 0 \(0: off\)"),
    (dict(worker_heartbeat_timeout=float("nan")), "worker_heartbeat_timeout must be a number of seconds >= 0"),
    (dict(dtype="float8"), "dtype must be one of auto, float32, bfloat16, float16, got 'float8'"),
    (dict(device="gpu"), "device must be a torch device"),
])
def test_resolve_rejects(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        EngineConfig(**kwargs).resolve()
    assert "\n" not in str(e.value)


def test_resolve_fills_in_and_freezes():
    r = EngineConfig(kv_cache_memory="2MiB").resolve()
    assert r.dtype == "float32" and r.kv_cache_memory == 2 * 2**20 and r.swap_space == 2**30
    assert EngineConfig(device="cuda").resolve().dtype == "bfloat16"  # no GPU needed to decide
    assert EngineConfig(dtype="bf16", quantization=None).resolve() == EngineConfig(dtype="bfloat16").resolve()
    assert r.resolve() == r  # idempotent
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.block_size = 32  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().max_num_seqs = 1  # type: ignore[misc]


def test_from_kwargs_rejects_unknown_names():
    with pytest.raises(InvalidRequestError, match=r"^unknown engine argument\(s\): bogus, max_seqs$"):
        EngineConfig.from_kwargs(max_seqs=4, bogus=1, block_size=8)
    c = EngineConfig.from_kwargs(block_size=8, model="m.gguf")
    assert (c.block_size, c.model, c.dtype) == (8, "m.gguf", "auto")  # not resolved yet


# -- simulate: the KV size per token is the model's -------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A: 2 layers x 2 KV heads x head_dim 16, as GGUF; B: 3 layers x 1 KV head x head_dim 16, as HF."""
    root = tmp_path_factory.mktemp("sim_models")
    a_hf = make_tiny_hf(root / "a", "llama")
    a = write_tiny_llama_gguf(a_hf, root / "a.gguf")
    b = make_tiny_hf(root / "b", "llama", num_hidden_layers=3, num_key_value_heads=1)
    return a, b, a_hf


@pytest.fixture()
def sim_inputs(tmp_path):
    from kvserve.sim.cost_model import LinearCostModel
    from kvserve.sim.workload import save_jsonl, synthetic

    LinearCostModel({"const": 0.01, "tokens": 1e-4}, num_samples=10).save(tmp_path / "cost.json")
    save_jsonl(synthetic(10, rate=5, seed=0), tmp_path / "w.jsonl")
    return ["--workload", str(tmp_path / "w.jsonl"), "--json", "--kv-cache-memory", "1MiB"], tmp_path / "cost.json"


def _kv_line(err: str) -> tuple[int, int]:
    m = re.search(r"(\d+) KV blocks of 16 per replica, (\d+) bytes of KV per token", err)
    assert m, err
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("which, kv_dtype, per_token", [
    (0, "auto", 2 * 2 * 2 * 16 * 4),  # layers x (K, V) x KV heads x head_dim x float32 (auto on CPU)
    (1, "auto", 3 * 2 * 1 * 16 * 4),
    (0, "bfloat16", 2 * 2 * 2 * 16 * 2),
    (0, "int8", 2 * 2 * 2 * (16 + 4)),  # int8 values plus one float32 scale per token and head
])
def test_simulate_kv_size_is_the_models(two_models, sim_inputs, capsys, which, kv_dtype, per_token):
    argv, cost = sim_inputs
    assert main(["simulate", "--model", str(two_models[which]), "--cost-model", str(cost),
                 "--kv-cache-dtype", kv_dtype, *argv]) == 0
    blocks, got = _kv_line(capsys.readouterr().err)
    assert got == per_token and blocks == 2**20 // (per_token * 16)


def test_simulate_roofline_takes_the_models_shape(two_models, sim_inputs, capsys):
    from kvserve.loader import model_source
    from kvserve.sim.cost_model import model_shape

    argv, _ = sim_inputs
    a, b, a_hf = two_models
    assert main(["simulate", "--hardware", "a100", "--model", str(b), *argv]) == 0
    err = capsys.readouterr().err
    assert _kv_line(err)[1] == 3 * 2 * 1 * 16 * 2  # bfloat16: the roofline's weights
    assert f"roofline {b.name} on 1x a100" in err
    shape = model_shape(str(a))
    # embeddings + LM head (untied) + final norm + 2 x (q, k, v, o, gate/up/down, 2 norms)
    params = 2 * 320 * 64 + 64 + 2 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 96 + 2 * 64)
    assert shape["params"] == params == model_source(a_hf).num_params()  # the GGUF and the HF directory agree
    assert (shape["num_layers"], shape["num_kv_heads"], shape["head_dim"], shape["num_heads"]) == (2, 2, 16, 4)
    assert main(["simulate", "--hardware", "a100", "--model", str(a), "--kv-cache-dtype", "int8", *argv]) == 0
    assert _kv_line(capsys.readouterr().err)[1] == 2 * 2 * 2 * (16 + 4)
    # --sim-model still names a table shape, whatever --model is
    assert main(["simulate", "--hardware", "a100", "--model", str(a), "--sim-model", "llama-8b", *argv[:-2],
                 "--kv-cache-memory", "1GiB"]) == 0
    assert _kv_line(capsys.readouterr().err)[1] == 32 * 2 * 8 * 128 * 2


def test_simulate_rejects_bad_flags(sim_inputs, capsys):
    argv, cost = sim_inputs
    assert main(["simulate", "--cost-model", str(cost), "--block-size", "0", *argv]) == 2
    assert "block_size must be an integer >= 1" in capsys.readouterr().err
    assert main(["simulate", "--hardware", "a100", *argv[:-2], "--kv-cache-memory", "lots"]) == 2
    assert "kv_cache_memory: cannot parse 'lots'" in capsys.readouterr().err

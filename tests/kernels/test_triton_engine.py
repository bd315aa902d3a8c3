"""End to end: a tiny random Llama through the engine gives the same greedy tokens on both backends."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

# CPU: the kernels run in the interpreter (conftest.py); CUDA: compiled, and decode CUDA graphs are captured
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from helpers import TINY_VOCAB, make_tiny_hf, random_ids, run_engine

from kvserve import SamplingParams
from kvserve.engine.llm_engine import LLMEngine
from kvserve.errors import InvalidRequestError
from kvserve.kernels.triton.backend import TritonAttentionBackend
from kvserve.layers.attention import Attention, TorchAttentionBackend
from kvserve.loader import load_model


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    return load_model(make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama"), device=DEVICE)


def generate(loaded, backend: str, prompts: list[list[int]]) -> tuple[list[list[int]], LLMEngine]:
    # a small token budget forces chunked prefill: steps mix decodes with extends over cached prefixes
    eng = LLMEngine(loaded=loaded, attention_backend=backend, device=DEVICE, kv_cache_memory="1MiB", block_size=8,
                    max_num_batched_tokens=24, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return run_engine(eng, prompts, params), eng


def test_engine_greedy_tokens_match_torch_backend(tiny_loaded, monkeypatch):
    plans = []
    original = TritonAttentionBackend.prepare

    def spy(self, meta):
        plans.append((meta.query_lens_cpu, meta.seq_lens_cpu))
        return original(self, meta)

    monkeypatch.setattr(TritonAttentionBackend, "prepare", spy)
    shared = random_ids(11, TINY_VOCAB, seed=99)
    prompts = [random_ids(n, TINY_VOCAB, seed=n) for n in (1, 9, 30)] + [shared + [5], shared + [7, 8]]
    want, _ = generate(tiny_loaded, "torch", prompts)
    got, eng = generate(tiny_loaded, "triton", prompts)
    layers = [m for m in tiny_loaded.model.modules() if isinstance(m, Attention)]
    assert layers and all(isinstance(m.backend, TritonAttentionBackend) for m in layers)
    assert got == want
    # the workload covered what it is meant to: steps mixing decodes with extends over a cached prefix
    assert any(1 in q and any(n > 1 and n < s for n, s in zip(q, sl)) for q, sl in plans)
    eng.kv.check_invariants()
    generate(tiny_loaded, "torch", prompts[:1])  # leave the shared model on the reference backend
    assert all(isinstance(m.backend, TorchAttentionBackend) for m in layers)


def test_unknown_backend_is_rejected(tiny_loaded):
    with pytest.raises(InvalidRequestError):
        LLMEngine(loaded=tiny_loaded, attention_backend="flash", device=DEVICE, kv_cache_memory="1MiB")


def test_decode_graph_padding_path_matches_torch_backend(tiny_loaded, monkeypatch):
    """The decode-graph path (static buffers, batches padded into a scratch block), run eagerly on CPU."""
    from kvserve.executor.cuda_graph import capture_sizes
    from kvserve.executor.model_runner import ModelRunner

    assert capture_sizes(5) == [1, 2, 4, 5] and capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    prompts = [random_ids(n, TINY_VOCAB, seed=n) for n in (3, 17, 9)]
    want, _ = generate(tiny_loaded, "torch", prompts)

    replayed = spy_graph_runs(monkeypatch, lambda ids, meta: ids.numel())
    original_init = LLMEngine.__init__

    def init_with_emulated_graphs(self, *a, **kw):
        original_init(self, *a, **kw)
        self.runner = ModelRunner(self.lm.model, self.budget.num_blocks, self.config.block_size, self.lm.dtype,
                                  self.device, decode_graphs="emulate", max_num_seqs=5,
                                  max_model_len=self.max_model_len)
        assert self.runner.graphs is not None
        # the scratch block lies past the manager's blocks: padding rows can never hit a live block
        assert self.runner.kv_caches[0].k.shape[0] == self.budget.num_blocks + 1

    monkeypatch.setattr(LLMEngine, "__init__", init_with_emulated_graphs)
    got, _ = generate(tiny_loaded, "triton", prompts)
    assert got == want
    assert 3 in replayed  # three decodes padded into the size-4 graph
    assert None not in replayed


def spy_graph_runs(monkeypatch, record) -> list:  # noqa: ANN001 - record(input_ids, meta) -> what to keep
    """Patches DecodeGraphRunner.run to note each call: record(...) when a graph ran it, None when none fit."""
    from kvserve.executor.cuda_graph import DecodeGraphRunner

    replayed = []
    original_run = DecodeGraphRunner.run

    def spy(self, input_ids, positions, meta):
        out = original_run(self, input_ids, positions, meta)
        replayed.append(record(input_ids, meta) if out is not None else None)
        return out

    monkeypatch.setattr(DecodeGraphRunner, "run", spy)
    return replayed


@pytest.mark.parametrize("max_num_seqs", [16, 2])
def test_verify_steps_replay_the_decode_graphs_one_row_per_token(tiny_loaded, monkeypatch, max_num_seqs):
    """A speculative verify step runs through the decode graphs (emulated here), each verified token as a
    one-token row over its own prefix: greedy tokens equal decoding without speculation on the torch backend.
    Past the largest graph (max_num_seqs 2) the same one-token rows run eagerly: still decodes."""
    from kvserve.executor.model_runner import ModelRunner

    # repeating prompts, so n-gram lookup finds drafts
    prompts = [(random_ids(5, TINY_VOCAB, seed=n) * 4)[: 4 * 5 - n] for n in (1, 2, 3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = LLMEngine(loaded=tiny_loaded, attention_backend="torch", device=DEVICE, kv_cache_memory="1MiB",
                      block_size=8)
    want = run_engine(plain, prompts, params)

    replayed = spy_graph_runs(monkeypatch, lambda ids, meta: (ids.numel(), len(set(meta.block_tables[:, 0].tolist()))))
    eager = []  # the query lengths of what ran outside the graphs
    original_forward = ModelRunner._model_forward

    def spy_forward(self, input_ids, positions, meta):
        eager.append(meta.query_lens_cpu)
        return original_forward(self, input_ids, positions, meta)

    monkeypatch.setattr(ModelRunner, "_model_forward", spy_forward)
    eng = LLMEngine(loaded=tiny_loaded, attention_backend="triton", device=DEVICE, kv_cache_memory="1MiB",
                    block_size=8, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                      "adaptive": False})
    eng.runner = ModelRunner(tiny_loaded.model, eng.budget.num_blocks, 8, tiny_loaded.dtype, eng.device,
                             decode_graphs="emulate", max_num_seqs=max_num_seqs, max_model_len=eng.max_model_len)
    got = run_engine(eng, prompts, params)
    assert got == want
    assert eng.scheduler.spec_stats.num_draft_tokens > 0
    decode_runs = [e for e in eager if all(q == 1 for q in e)]
    if max_num_seqs == 16:  # verify steps: more rows than sequences went through the graphs
        assert any(rows > seqs for rows, seqs in filter(None, replayed)) and None not in replayed
    else:  # none fit in the graphs of 1 or 2 rows: each ran eagerly as one-token rows
        assert None in replayed and any(len(e) > len(prompts) for e in decode_runs)
    assert len(decode_runs) >= replayed.count(None)  # every step the graphs refused still ran as decodes
    eng.kv.check_invariants()
    generate(tiny_loaded, "torch", prompts[:1])  # leave the shared model on the reference backend

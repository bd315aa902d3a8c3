"""Measure real engine steps and fit the simulator's step-time model to them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np

from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.scheduler import SchedulerOutput
from kvserve.sampling_params import SamplingParams
from kvserve.sim.cost_model import BatchFeatures, LinearCostModel, batch_features

logger = logging.getLogger(__name__)


class StepRecorder:
    """Keeps (batch features, seconds) of every engine step that ran a batch, through the engine's
    step-observer hook, while attached."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.samples: list[tuple[BatchFeatures, float]] = []

    def observe(self, so: SchedulerOutput, seconds: float) -> None:
        if so.scheduled:
            self.samples.append((batch_features(so), seconds))

    @contextlib.contextmanager
    def attached(self) -> Iterator["StepRecorder"]:
        self.engine.step_observers.append(self.observe)
        try:
            yield self
        finally:
            self.engine.step_observers.remove(self.observe)


def calibration_batch_sizes(engine: LLMEngine, max_seqs: int | None = None) -> list[int]:
    """1, 2, 4, ... up to max_seqs (default the engine's), and max_seqs itself."""
    top = max_seqs or engine.config.max_num_seqs
    return sorted({1, 2, 4, 8, 16, 32, 64, top} & set(range(1, top + 1)))


def calibration_samples(engine: LLMEngine, seed: int = 0, max_seqs: int | None = None,
                        prompt_lens: tuple[int, ...] = (16, 96, 384), max_tokens: int = 24
                        ) -> list[tuple[BatchFeatures, float]]:
    """Measured steps of batches of 1..max_seqs synthetic requests at several prompt lengths."""
    rng = np.random.default_rng(seed)
    vocab = engine.lm.config.vocab_size
    sizes = calibration_batch_sizes(engine, max_seqs)
    rec = StepRecorder(engine)
    engine.add_request("calib-warmup", [1, 2, 3, 4], SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    with rec.attached():
        for b in sizes:
            for plen in prompt_lens:
                for i in range(b):
                    ids = rng.integers(100, vocab - 100, size=plen).tolist()
                    n = int(rng.integers(max_tokens // 2, max_tokens + 1))
                    engine.add_request(f"calib-{b}-{plen}-{i}", ids,
                                       SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
                while engine.has_unfinished_requests():
                    engine.step()
            logger.info("calibrated batch size %d: %d steps so far", b, len(rec.samples))
    return rec.samples


def calibrate(engine: LLMEngine, seed: int = 0, max_seqs: int | None = None, prompt_lens: tuple[int, ...] = (16, 96, 384),
              max_tokens: int = 24) -> LinearCostModel:
    """Run batches of 1..max_seqs synthetic requests (several prompt lengths) and fit the linear model."""
    return LinearCostModel.fit(calibration_samples(engine, seed, max_seqs, prompt_lens, max_tokens),
                               source=f"kvserve simulate --calibrate, batch sizes {calibration_batch_sizes(engine, max_seqs)}")

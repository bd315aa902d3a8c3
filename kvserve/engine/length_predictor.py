"""Output-length prediction for the lpf policy: cheap, online, with a cold-start fallback.

The model is a ridge regression of log(1 + output tokens) on features the engine already has
at admission: hashed unigrams and bigrams of the prompt's token ids (what the prompt asks for:
"one word", "yes or no", "a detailed essay"), log prompt length, and the sampling params that
bound or stretch an answer (max_tokens, temperature). It is fitted by recursive least squares:
each finished request is one O(dim^2) update of the inverse Gram matrix, so learning is online
and exact (the same solution a batch ridge fit over all finished requests would give).
A prediction is one dot product. Until `min_observations` requests have finished, it predicts
a constant (the mean so far, or `prior_tokens`), which makes lpf rank like fcfs at cold start.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from kvserve.engine.request import Request


class LengthPredictor(Protocol):
    def predict(self, req: Request) -> float:
        """Expected total output tokens of a request that has not run yet."""
        ...

    def observe(self, req: Request) -> None:
        """Learn from a finished request."""
        ...


_H1, _H2 = 0x9E3779B1, 0x85EBCA77  # multiplicative hashing constants (deterministic across runs)


class OnlineLengthPredictor:
    def __init__(self, dim: int = 512, ridge: float = 1.0, forgetting: float = 1.0,
                 min_observations: int = 4, prior_tokens: float = 128.0) -> None:
        self.dim = dim
        self.num_hashed = dim - 4  # the last 4 slots: bias, log prompt length, log max_tokens, temperature
        self.forgetting = forgetting
        self.min_observations = min_observations
        self.prior_tokens = prior_tokens
        self.P = np.eye(dim) / ridge  # inverse of (ridge * I + sum of x x^T)
        self.w = np.zeros(dim)
        self.num_observations = 0
        self._sum_log = 0.0

    def features(self, req: Request) -> np.ndarray:
        x = np.zeros(self.dim)
        ids = req.prompt_token_ids
        m = self.num_hashed
        for t in ids:
            x[(t * _H1) % m] += 1.0
        for a, b in zip(ids, ids[1:]):
            x[((a * _H1) ^ (b * _H2)) % m] += 1.0
        norm = np.linalg.norm(x[:m])
        if norm > 0:
            x[:m] /= norm
        cap = req.max_total_tokens - req.num_prompt_tokens
        x[m] = 1.0
        x[m + 1] = math.log1p(len(ids)) / 8
        x[m + 2] = math.log1p(max(cap, 0)) / 8
        x[m + 3] = req.params.temperature
        return x

    def _cap(self, req: Request, tokens: float) -> float:
        return float(min(max(tokens, 1.0), max(req.max_total_tokens - req.num_prompt_tokens, 1)))

    def predict(self, req: Request) -> float:
        if self.num_observations < self.min_observations:
            prior = math.expm1(self._sum_log / self.num_observations) if self.num_observations else self.prior_tokens
            return self._cap(req, prior)
        y = float(self.features(req) @ self.w)
        return self._cap(req, math.expm1(min(y, 20.0)))

    def observe(self, req: Request) -> None:
        y = math.log1p(len(req.output_token_ids))
        x = self.features(req)
        # recursive least squares (Sherman-Morrison update of P); lam < 1 discounts old requests
        lam = self.forgetting
        Px = self.P @ x
        k = Px / (lam + x @ Px)
        self.w += k * (y - x @ self.w)
        self.P = (self.P - np.outer(k, Px)) / lam
        self.num_observations += 1
        self._sum_log += y

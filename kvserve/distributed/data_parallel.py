"""Data parallelism: R engine replicas behind one API server, and the router that picks one.

Replicas live in the server process, each an `AsyncLLMEngine` with its own engine thread,
scheduler and KV cache, sharing one read-only copy of the weights. This keeps the server and
streaming code unchanged (the front below has the interface the server uses) and costs one
copy of the weights instead of R. PyTorch releases the GIL inside its kernels, so replicas
compute concurrently; what they share is the CPU's cores (on GPUs, one replica per device).

Routing: a request goes to the replica holding the longest cached prefix of its prompt, else to
the least-loaded one. The router does not ask the replicas: it hashes the prompt's full blocks
exactly as the KV cache manager does (`kv_cache.hash_block`, chained) and keeps, per replica,
an LRU record of the block hashes it routed there, bounded by that replica's number of blocks.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

from kvserve.config import ModelConfig
from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.engine.kv_cache import hash_block
from kvserve.engine.outputs import RequestOutput
from kvserve.loader.tokenizer import Tokenizer
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ROUTING_POLICIES = ("prefix", "round_robin")


class PrefixRouter:
    """Longest-cached-prefix routing with a least-loaded fallback (or plain round-robin)."""

    def __init__(self, num_replicas: int, block_size: int, capacity_blocks: int, policy: str = "prefix") -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.capacity = max(1, capacity_blocks)
        self.policy = policy
        self.records: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.load = [0] * num_replicas  # requests routed and not yet finished
        self.routed = [0] * num_replicas
        self.prefix_routed = [0] * num_replicas  # of which for a recorded prefix
        self._next = 0

    def block_hashes(self, ids: list[int]) -> list[bytes]:
        """Hashes of the full blocks the cache could reuse (the last token is always computed)."""
        bs, hashes = self.block_size, []
        for i in range((len(ids) - 1) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, ids[i * bs : (i + 1) * bs]))
        return hashes

    def route(self, ids: list[int]) -> int:
        """Pick a replica for a prompt and record its blocks there."""
        if self.policy == "round_robin":
            i = self._next
            self._next = (self._next + 1) % self.num_replicas
        else:
            hashes = self.block_hashes(ids)
            matched = [0] * self.num_replicas
            for r, rec in enumerate(self.records):
                for h in hashes:
                    if h not in rec:
                        break
                    matched[r] += 1
            best = max(matched)
            candidates = [r for r in range(self.num_replicas) if matched[r] == best]
            i = min(candidates, key=lambda r: (self.load[r], self.routed[r]))
            if best:
                self.prefix_routed[i] += 1
            rec = self.records[i]
            for h in hashes:
                rec[h] = None
                rec.move_to_end(h)
            while len(rec) > self.capacity:
                rec.popitem(last=False)
        self.routed[i] += 1
        return i


class DataParallelEngine:
    """The AsyncLLMEngine interface over R replicas (what `build_app` needs)."""

    def __init__(self, replicas: list[AsyncLLMEngine], policy: str = "prefix") -> None:
        self.replicas = replicas
        self.engine = replicas[0].engine  # tokenizer and limits: the same model on every replica
        kv = self.engine.kv
        self.router = PrefixRouter(len(replicas), kv.block_size, kv.num_blocks, policy)

    @property
    def alive(self) -> bool:
        return all(r.alive for r in self.replicas)

    @property
    def error(self) -> BaseException | None:
        """The first replica's crash, if any (one dead replica makes the server unhealthy)."""
        return next((r.error for r in self.replicas if r.error is not None), None)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.replicas[0].tokenizer

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    @property
    def model_config(self) -> ModelConfig:
        return self.replicas[0].model_config

    @property
    def stats(self) -> dict:
        """Sums over replicas (means for fractions), plus each replica's own under "per_replica"."""
        per = [dict(r.stats) for r in self.replicas]
        agg: dict = {k: sum(s[k] for s in per) for k in per[0]}
        for k in ("kv_cache_usage_perc", "kv_internal_waste_perc"):
            agg[k] = agg[k] / len(per)
        if "spec_decode_num_drafts" in agg:  # ratios of the summed counters, not sums of ratios
            drafts, drafted = agg["spec_decode_num_drafts"], agg["spec_decode_num_draft_tokens"]
            accepted = agg["spec_decode_num_accepted_tokens"]
            agg["spec_decode_acceptance_rate"] = accepted / drafted if drafted else 0.0
            agg["spec_decode_mean_accepted_length"] = 1.0 + accepted / drafts if drafts else 0.0
        for i, s in enumerate(per):
            s["router_routed"] = self.router.routed[i]
            s["router_prefix_routed"] = self.router.prefix_routed[i]
        agg["per_replica"] = per
        return agg

    def num_waiting(self) -> int:
        return sum(r.num_waiting() for r in self.replicas)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        try:
            ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            i = self.router.route(ids)
        except (TypeError, ValueError, OverflowError):  # a malformed prompt: the replica reports it properly
            i = min(range(len(self.replicas)), key=lambda r: self.router.load[r])
        self.router.load[i] += 1
        try:
            async for out in self.replicas[i].generate(request_id, prompt, params):
                yield out
        finally:
            self.router.load[i] -= 1

    def shutdown(self, timeout: float = 5.0) -> None:
        for r in self.replicas:
            r.shutdown(timeout)

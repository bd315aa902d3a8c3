"""What attention needs to know about a flat batch of tokens over a paged KV cache.

The batch holds the new tokens of several sequences back to back (no padding). Sequence i
owns tokens ``query_start_loc[i]:query_start_loc[i+1]``; after this step it has
``seq_lens[i]`` tokens in total, the new ones being the last. With a KV cache, the new
K/V are written at ``slot_mapping`` (block * block_size + offset) and each sequence reads
its whole context through its row of ``block_tables``. Without a cache (a one-shot
forward), every sequence is entirely new.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


class AttentionPlan:
    """A backend's per-step digest of the metadata (which sequences go to which kernel), shared by
    every layer. Each backend subclasses it; `AttentionBackend.prepare` makes one."""


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32, context length after this step (cached + new)
    query_lens_cpu: list[int]  # host copies, for planning
    seq_lens_cpu: list[int]
    slot_mapping: torch.Tensor | None = None  # [T] int64 cache slot of each new token (>= 0)
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    # set once per step by whoever runs the forward: plan = backend.prepare(meta); None: each layer prepares
    plan: AttentionPlan | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @classmethod
    def flat(cls, query_lens: list[int], seq_lens: list[int], slot_mapping: torch.Tensor | None,
             block_tables: torch.Tensor | None, device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata of a flat batch from its host-side lengths (the tensors moved to `device`)."""
        on_host = torch.device(device).type == "cpu"  # then no .to() calls: each is a dispatch

        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or on_host else t.to(device)

        return cls(
            query_start_loc=torch.tensor(list(itertools.accumulate(query_lens, initial=0)), dtype=torch.int32,
                                         device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            slot_mapping=moved(slot_mapping),
            block_tables=moved(block_tables),
        )

    @classmethod
    def for_prefill(cls, lens: list[int], device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata for whole sequences run once with no KV cache."""
        return cls.flat(lens, lens, None, None, device)

"""A minimal generation loop over the paged KV cache: the reference the engine is tested against
(tests only: production code never imports it).

Each sequence gets a fixed run of blocks; every step runs one flat batch (the whole prompts
first, then one token per sequence). No scheduling, no sampling beyond greedy.
"""

from __future__ import annotations

import torch
from torch import nn

from kvserve.layers.attention import AttentionMetadata, allocate_kv_caches


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    block_size: int = 16,
    stop_ids: set[int] | None = None,
    kv_dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt (new tokens only), all sequences batched together."""
    device = next(model.parameters()).device
    dtype = kv_dtype or next(model.parameters()).dtype
    max_len = max(len(p) for p in prompts) + max_new_tokens
    blocks_per_seq = (max_len + block_size - 1) // block_size
    caches = allocate_kv_caches(model, blocks_per_seq * len(prompts), block_size, dtype, device)
    block_tables = torch.arange(blocks_per_seq * len(prompts), dtype=torch.int32, device=device).view(len(prompts), -1)
    seqs = [list(p) for p in prompts]
    done = [False] * len(prompts)
    num_computed = [0] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        active = [i for i in range(len(seqs)) if not done[i]]
        if not active:
            break
        ids, pos, slots, qlens, slens = [], [], [], [], []
        for i in active:
            new = list(range(num_computed[i], len(seqs[i])))
            ids += [seqs[i][p] for p in new]
            pos += new
            slots += [int(block_tables[i, p // block_size]) * block_size + p % block_size for p in new]
            qlens.append(len(new))
            slens.append(len(seqs[i]))
        qsl = torch.zeros(len(active) + 1, dtype=torch.int32)
        qsl[1:] = torch.tensor(qlens).cumsum(0)
        meta = AttentionMetadata(
            query_start_loc=qsl.to(device),
            seq_lens=torch.tensor(slens, dtype=torch.int32, device=device),
            query_lens_cpu=qlens,
            seq_lens_cpu=slens,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=block_tables[active],
        )
        hidden = model(torch.tensor(ids, device=device), torch.tensor(pos, device=device), meta, caches)
        last = (qsl[1:] - 1).to(device)
        next_ids = model.compute_logits(hidden[last]).argmax(-1).tolist()
        for i, t in zip(active, next_ids):
            num_computed[i] = len(seqs[i])
            seqs[i].append(t)
            out[i].append(t)
            if stop_ids and t in stop_ids:
                done[i] = True
    return out

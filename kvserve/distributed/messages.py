"""The control messages rank 0 sends its workers, and how they travel.

A step is flattened once, on rank 0, from the SchedulerOutput into `StepMsg`: the flat batch's
tensors (what `ModelRunner.prepare` builds), the block copies, and which rows need logits.
Workers never see Request objects. Each message is pickled once and sent point-to-point on the
gloo control group (a length, then the bytes), so a pipeline stage still busy with an earlier
micro-batch never holds up rank 0.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TAG_LEN, TAG_MSG, TAG_HIDDEN, TAG_LOGITS = 11, 12, 13, 14
NO_TIMEOUT = datetime.timedelta(days=365)  # an idle worker waits for the next step as long as it takes


@dataclass
class StepMsg:
    input_ids: torch.Tensor
    positions: torch.Tensor
    query_lens: list[int]
    seq_lens: list[int]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    logit_rows: list[int]  # rows of the flat batch whose logits the last stage computes, in order
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)


class Outbox:
    """Non-blocking sends whose buffers must live until they complete."""

    def __init__(self) -> None:
        self._pending: list[tuple[object, tuple[torch.Tensor, ...]]] = []

    def send(self, tensor: torch.Tensor, dst: int, tag: int, group: object | None = None, *keep: torch.Tensor) -> None:
        self._pending.append((dist.isend(tensor, dst, group=group, tag=tag), (tensor, *keep)))
        if len(self._pending) > 64:
            self.drain(keep_last=16)

    def drain(self, keep_last: int = 0, timeout: datetime.timedelta | None = None) -> None:
        while len(self._pending) > keep_last:
            work, _ = self._pending.pop(0)
            work.wait(timeout) if timeout is not None else work.wait()


def send_obj(outbox: Outbox, obj: object, dst: int, group: object | None) -> None:
    payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    outbox.send(torch.tensor([payload.numel()], dtype=torch.int64), dst, TAG_LEN, group)
    outbox.send(payload, dst, TAG_MSG, group)


def recv_obj(src: int, group: object | None, timeout: datetime.timedelta = NO_TIMEOUT) -> object:
    n = torch.zeros(1, dtype=torch.int64)
    dist.irecv(n, src, group=group, tag=TAG_LEN).wait(timeout)
    buf = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.irecv(buf, src, group=group, tag=TAG_MSG).wait(timeout)
    return pickle.loads(buf.numpy().tobytes())

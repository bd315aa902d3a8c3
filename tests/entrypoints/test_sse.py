"""SSE framing: every event is one line for any line-by-line reader, whatever text the model produced."""

from __future__ import annotations

import json

from httpx._decoders import LineDecoder

from kvserve.entrypoints.openai.sse import sse

# what str.splitlines() (and httpx's aiter_lines) splits on, besides \n and \r
ODD_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_an_event_survives_splitlines_readers():
    text = f"a{ODD_BREAKS}b\n\r\té€"
    event = sse({"choices": [{"text": text}]})
    assert event.endswith("\n\n") and event.count("\n") == 2
    lines = [ln for ln in LineDecoder().decode(event) if ln]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:]) == {"choices": [{"text": text}]}
    assert "é€" in event  # other text stays as it is (no blanket ASCII escaping)

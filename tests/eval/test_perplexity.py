"""`kvserve eval ppl` against the same computation done with transformers."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvserve.entrypoints.cli import main
from kvserve.eval.perplexity import perplexity, prepare_text

from helpers import CTX, ppl_text

pytestmark = pytest.mark.slow

def hf_reference_ppl(hf, tokens: list[int], ctx: int) -> float:
    nll, count = 0.0, 0
    first = ctx // 2
    for c in range(len(tokens) // ctx):
        chunk = torch.tensor([tokens[c * ctx : (c + 1) * ctx]])
        with torch.no_grad():
            logits = hf(chunk).logits[0].double()
        lp = torch.log_softmax(logits[first : ctx - 1], dim=-1)
        tgt = chunk[0, first + 1 :]
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        count += len(tgt)
    return math.exp(nll / count)


def test_ppl_matches_transformers(smollm, smollm_ppl, hf_smollm, tmp_path, capsys):
    text = ppl_text()
    tokens = smollm.tokenizer.encode(prepare_text(text))
    assert len(tokens) >= 4 * CTX
    ours = smollm_ppl
    ref = hf_reference_ppl(hf_smollm, tokens, CTX)
    assert ours.num_chunks == len(tokens) // CTX and ours.num_scored == ours.num_chunks * (CTX - 1 - CTX // 2)
    assert abs(ours.ppl - ref) / ref < 1e-3
    assert 1.5 < ours.ppl < 60 and 0 < ours.stderr < ours.ppl

    f = tmp_path / "text.txt"
    f.write_text(text)
    assert main(["eval", "ppl", "--file", str(f), "--ctx", str(CTX)]) == 0
    m = re.search(r"PPL = ([0-9.]+) \+/- ([0-9.]+)", capsys.readouterr().out)
    assert m and abs(float(m.group(1)) - ours.ppl) < 1e-3


def test_ppl_text_too_short(tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("Too short.\n")
    assert main(["eval", "ppl", "--file", str(f), "--ctx", str(CTX)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("kvserve: error: text has 3 tokens; need at least ctx=512")


def test_ppl_through_paged_caches(smollm, smollm_ppl):
    """The float cache changes nothing; an int8 cache stays within 1% of it."""
    text = ppl_text()
    fresh = smollm_ppl
    paged = perplexity(smollm, text, ctx=CTX, kv_cache_dtype="auto")
    int8 = perplexity(smollm, text, ctx=CTX, kv_cache_dtype="int8")
    assert abs(paged.ppl - fresh.ppl) / fresh.ppl < 1e-5
    assert int8.ppl != paged.ppl  # the int8 cache is really read
    assert abs(int8.ppl - paged.ppl) / paged.ppl < 0.01

"""Pruning: exact sparsity per row and exact N:M patterns; Wanda and SparseGPT lose less of a
layer's output than magnitude pruning; `kvserve prune` writes a GGUF kvserve loads back exactly."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch

from helpers import layer_stats, split_text
from kvserve.entrypoints.cli import main
from kvserve.loader import load_model
from kvserve.quant.awq import output_error
from kvserve.quant.calibrate import LINEARS
from kvserve.quant.prune import lowest_mask, magnitude_prune, parse_pattern, sparsegpt_prune, wanda_prune


@pytest.fixture(scope="module")
def tiny_stats(tiny_gguf):
    lm = load_model(tiny_gguf, quantization="none")
    calib, held = split_text()
    return lm, layer_stats(lm, calib, 2048), layer_stats(lm, held, 2048)


def _prunes(w, s, sparsity, pattern):
    return {"magnitude": magnitude_prune(w, sparsity, pattern),
            "wanda": wanda_prune(w, s.col_norm, sparsity, pattern),
            "sparsegpt": sparsegpt_prune(w, s.h, sparsity, pattern)}


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.3, None), (None, (2, 4)), (None, (1, 4))])
def test_exact_sparsity_and_patterns(tiny_stats, sparsity, pattern):
    lm, cal, _ = tiny_stats
    layer = lm.model.model.layers[1]
    for name in LINEARS:
        w = layer.get_submodule(name).weight.detach()
        n, k = w.shape
        for method, p in _prunes(w, cal[1][name], sparsity, pattern).items():
            zeros = p == 0
            if pattern is None:
                assert torch.equal(zeros.sum(1), torch.full((n,), int(k * sparsity))), (method, name)
            else:
                keep, m = pattern
                assert torch.equal(zeros.view(n, k // m, m).sum(2), torch.full((n, k // m), m - keep)), (method, name)
            if method != "sparsegpt":  # the kept weights untouched (SparseGPT compensates them)
                assert torch.equal(p[~zeros], w[~zeros])


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (None, (2, 4))])
def test_wanda_and_sparsegpt_lose_less_than_magnitude(tiny_stats, sparsity, pattern):
    lm, cal, held = tiny_stats
    for i, layer in enumerate(lm.model.model.layers):
        for name in LINEARS:
            w = layer.get_submodule(name).weight.detach()
            errs = {(m, which): output_error(w, p, st[i][name].h)
                    for m, p in _prunes(w, cal[i][name], sparsity, pattern).items()
                    for which, st in (("calib", cal), ("held", held))}
            for which in ("calib", "held"):
                assert errs["wanda", which] < errs["magnitude", which], (i, name, which, errs)
            assert errs["sparsegpt", "calib"] < errs["wanda", "calib"], (i, name, errs)


def test_lowest_mask_picks_the_lowest():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 7.0, 5.0, 6.0]])
    assert lowest_mask(s, 0.5).tolist() == [[True, True, True, True, False, False, False, False]]
    assert lowest_mask(s, pattern=(2, 4)).tolist() == [[False, True, False, True, False, False, True, True]]
    with pytest.raises(ValueError):
        parse_pattern("4:2")


@pytest.mark.parametrize("method,how,fmt", [("wanda", ["--pattern", "2:4"], "f16"), ("sparsegpt", ["--sparsity", "0.5"], "q8_0"),
                                            ("magnitude", ["--sparsity", "0.5"], "f32")])
def test_cli_prune_writes_a_gguf_kvserve_loads(tiny_gguf, tmp_path, capsys, method, how, fmt):
    calib, _ = split_text()
    (tmp_path / "c.txt").write_text(calib)
    out = tmp_path / "p.gguf"
    assert main(["prune", str(tiny_gguf), "--method", method, *how, "--format", fmt,
                 "--calib-file", str(tmp_path / "c.txt"), "--calib-tokens", "1024", "--out", str(out)]) == 0
    said = re.search(r"([0-9.]+) of the linears' weights are zero", capsys.readouterr().out)
    zero = float(said.group(1))
    assert zero == 0.5 if fmt.startswith("f") else 0.5 <= zero < 0.55  # rounding to q8_0 zeroes a few more
    r = gguf.GGUFReader(str(out))
    t = {t.name: t for t in r.tensors}["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == fmt.upper()
    vals = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1, 96)
    assert (vals == 0).sum() >= vals.size // 2
    if how[0] == "--pattern":
        assert ((vals.reshape(vals.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    lm = load_model(out, quantization="none")
    down = lm.model.model.layers[0].mlp.down_proj.weight
    np.testing.assert_array_equal(down.numpy(), vals.astype(np.float32))


@pytest.mark.parametrize("argv,msg", [
    (["--method", "wanda", "--sparsity", "0.5"], "needs --calib-file"),
    (["--method", "magnitude", "--pattern", "2-4"], "is not N:M"),
    (["--method", "magnitude", "--sparsity", "1.5"], "must be in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "0.5", "--format", "q3_k"], "unknown --format"),
])
def test_cli_prune_errors_are_one_line(capsys, tmp_path, argv, msg):
    capsys.readouterr()
    assert main(["prune", *argv, "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvserve: error: ") and err.count("\n") == 1 and msg in err

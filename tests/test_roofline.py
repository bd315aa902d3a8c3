"""`kvserve roofline`: measured once, cached per machine, printed; and the roofline line next to a speed."""

from __future__ import annotations

import json

import pytest
import torch

from kvserve import roofline
from kvserve.entrypoints.cli import main

SMALL = ["--read-size", "8MiB", "--gemm-n", "96"]  # seconds matter in the suite: small, still real, measurements


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_measured_once_then_cached(cache_dir, capsys, monkeypatch):
    assert main(["roofline", *SMALL, "--json"]) == 0
    first = _json(capsys)
    assert first["cached"] is False and first["read_bandwidth_gb_s"] > 0 and first["gemm_gflop_s"] > 0
    assert first["ridge_flop_per_byte"] == pytest.approx(first["gemm_gflop_s"] / first["read_bandwidth_gb_s"])
    stored = json.loads((cache_dir / "roofline.json").read_text())
    assert list(stored) == [roofline.machine_key(torch.device("cpu"))]

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(roofline, "measure", no_measuring)
    assert main(["roofline", "--json"]) == 0  # other sizes asked for: the cached peaks still answer
    again = _json(capsys)
    assert again["cached"] is True
    assert {k: again[k] for k in stored[roofline.machine_key(torch.device("cpu"))]} == \
        {k: first[k] for k in stored[roofline.machine_key(torch.device("cpu"))]}
    monkeypatch.undo()
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(cache_dir))
    assert main(["roofline", *SMALL, "--remeasure", "--json"]) == 0
    redone = _json(capsys)
    assert redone["cached"] is False and redone["measured_at"] > first["measured_at"]


def test_printed_figures_and_a_model_ceiling(cache_dir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    assert main(["roofline", *SMALL, "--model", str(model)]) == 0
    out = capsys.readouterr().out
    peaks = roofline.cached(torch.device("cpu"))
    assert f"{peaks.read_bandwidth_gb_s:10.1f} GB/s" in out and "GFLOP/s (96^3 float32)" in out
    assert "ridge point" in out and "memory-IO bound" in out
    assert f"at most {peaks.read_bandwidth_gb_s * 1e9 / 2_000_000:.1f} tok/s" in out


def test_an_unreadable_cache_is_measured_again(cache_dir, capsys):
    cache_dir.mkdir(parents=True)
    (cache_dir / "roofline.json").write_text("{not json")
    assert main(["roofline", *SMALL, "--json"]) == 0
    assert _json(capsys)["cached"] is False
    assert json.loads((cache_dir / "roofline.json").read_text())  # rewritten whole


def test_the_roofline_line():
    p = roofline.Peaks(read_bandwidth_gb_s=10.0, gemm_gflop_s=100.0, gemm_shape="8^3 float32", device="cpu:x",
                       threads=1, measured_at=0.0)
    assert p.ridge_flop_per_byte == 10.0
    low = roofline.line(p, 5e9, 20e9)  # 4 FLOP/byte
    assert "5.00 GB/s of weights read = 50% of the measured 10.0 GB/s" in low and "memory-IO bound" in low
    high = roofline.line(p, 2e9, 60e9)  # 30 FLOP/byte
    assert "60% of 100" in high and "compute bound" in high
    assert "`kvserve roofline` measures the peaks" in roofline.line(None, 1e9)


@pytest.mark.parametrize("flags, message", [
    (["--read-size", "lots"], "--read-size takes a size"),
    (["--gemm-n", "2"], "--gemm-n >= 8"),
    (["--num-threads", "0"], "--num-threads must be >= 1"),
    (["--device", "tpu"], "--device tpu: not available here"),
    (["--model", "/no/such/model"], "no such file or directory"),
])
def test_bad_flags(flags, message, cache_dir, capsys):
    assert main(["roofline", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err

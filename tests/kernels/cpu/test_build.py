"""Building the kernels: one compiler per source at once, then one link (build._compile); a compiler's
error comes back as one RuntimeError naming what failed, and nothing half-built is left behind."""

from __future__ import annotations

import ctypes
import importlib

import pytest

build_mod = importlib.import_module("kvserve.kernels.cpu.build")  # the package exports a `build` function


def _sources(tmp_path, n: int):
    srcs = []
    for i in range(n):
        src = tmp_path / f"part{i}.c"
        src.write_text(f"int kv_part{i}(int x) {{ return x * {i + 2}; }}\n" + "/* pad */\n" * i)
        srcs.append(src)
    return srcs


def test_each_source_compiled_then_linked_into_one_library(tmp_path):
    out = tmp_path / "lib" / "parts.so"
    out.parent.mkdir()
    build_mod._compile(["gcc", "-O2", "-shared", "-fPIC"], _sources(tmp_path, 5), out, "the parts")
    lib = ctypes.CDLL(str(out))
    assert [getattr(lib, f"kv_part{i}")(10) for i in range(5)] == [20, 30, 40, 50, 60]
    assert [p.name for p in out.parent.iterdir()] == ["parts.so"]  # the objects' directory is gone


def test_a_failing_source_is_named_with_the_compiler_message(tmp_path):
    srcs = _sources(tmp_path, 4)
    srcs[2].write_text("int kv_broken(void) { return undeclared_name; }\n")
    out = tmp_path / "lib" / "parts.so"
    out.parent.mkdir()
    with pytest.raises(RuntimeError, match=r"(?s)compiling the parts failed:\npart2\.c: .*undeclared_name"):
        build_mod._compile(["gcc", "-O2", "-shared", "-fPIC"], srcs, out, "the parts")
    assert not list(out.parent.iterdir())


def test_a_bad_flag_fails_the_kernel_build_and_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KVSERVE_CFLAGS", "-fno-such-kvserve-flag")
    with pytest.raises(RuntimeError, match=r"(?s)compiling the scalar kernels failed:\n[a-z_0-9]+\.c: .*no-such-kvserve-flag"):
        build_mod.build("scalar")
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="compiling the scalar check driver failed"):
        build_mod.build_check_driver(tmp_path / "drv", "scalar", "gcc", ["-fno-such-kvserve-flag"])
    assert not (tmp_path / "drv").exists()

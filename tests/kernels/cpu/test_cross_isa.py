"""The kernels' C driver (kernels/cpu/check_kernels.c) built per ISA and run as a program: every
variant's records against the scalar build's. The x86 variants run here; the NEON variants (with
and without the dot-product extension) are cross-compiled with aarch64-linux-gnu-gcc and run under
qemu-aarch64 (CI installs both: .ci/run)."""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest

from kvserve.kernels import cpu as native

BITWISE = ("act_u8", "act_u8_scale", "act_s8", "act_s8_scales", "gemm_q8", "gemm_q4", "act_s8h_sums", "gemm_w5",
           "gemm_w6", "gemm_w8", "gemm_f32", "argmax")  # exact integer paths, float32's one summation order, indices


def _records(cmd: list[str]) -> dict[str, bytes]:
    raw = subprocess.run(cmd, capture_output=True, check=True, timeout=300).stdout
    out, i = {}, 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        name = raw[i + 4 : i + 4 + n].decode()
        (size,) = struct.unpack_from("<Q", raw, i + 4 + n)
        start = i + 12 + n
        out[name] = raw[start : start + size]
        i = start + size
    return out


def _compare(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert got.keys() == want.keys() and len(got) == 19
    tie, masked, nan = np.frombuffer(want["argmax"], np.int64)[1:]  # the driver's rows (check_kernels.c)
    assert tie == 300 and masked >= 400 and nan == 700
    for name in want.keys() - {"isa"}:
        if name in BITWISE:
            assert got[name] == want[name], name
        else:
            a, b = np.frombuffer(got[name], np.float32), np.frombuffer(want[name], np.float32)
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.fixture(scope="module")
def scalar_x86(tmp_path_factory):
    exe = tmp_path_factory.mktemp("drv") / "check_scalar"
    native.build_check_driver(exe, "scalar", "gcc", [])
    return _records([str(exe)])


@pytest.mark.parametrize("isa", [i for i in native.supported_isas() if i != "scalar"])
def test_host_variant_driver_matches_scalar(tmp_path, scalar_x86, isa):
    exe = tmp_path / f"check_{isa}"
    native.build_check_driver(exe, isa, "gcc", native._isa_flags(isa))
    got = _records([str(exe)])
    assert got["isa"] == isa.encode() and scalar_x86["isa"] == b"scalar"
    _compare(got, scalar_x86)


CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


NEEDS_QEMU = pytest.mark.skipif(CROSS is None or QEMU is None,
                                reason="needs gcc-aarch64-linux-gnu and qemu-user (apt-get install; .ci/run installs them)")


@pytest.fixture(scope="module")
def scalar_arm(tmp_path_factory):
    """The scalar reference built for aarch64 and run under qemu (once for both NEON variants)."""
    exe = tmp_path_factory.mktemp("drv_arm") / "check_scalar_arm"
    native.build_check_driver(exe, "scalar", CROSS, ["-march=armv8-a"])
    return _records([QEMU, str(exe)])


@NEEDS_QEMU
@pytest.mark.parametrize("dotprod", [True, False])
def test_neon_matches_scalar_under_qemu(tmp_path, scalar_x86, scalar_arm, dotprod):
    neon = tmp_path / "check_neon"
    native.build_check_driver(neon, "neon", CROSS, native.NEON_FLAGS[dotprod])
    arm_scalar, got = scalar_arm, _records([QEMU, str(neon)])
    assert got["isa"] == b"neon" and arm_scalar["isa"] == b"scalar"
    _compare(got, arm_scalar)
    _compare(arm_scalar, scalar_x86)  # the portable reference itself agrees across architectures

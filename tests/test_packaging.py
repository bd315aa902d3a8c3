"""Every non-Python file the package needs at run time is declared package data, so a wheel (not only
an editable checkout) carries it: the C kernels are compiled on the user's machine from their sources."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_data_file_under_kvserve_is_package_data():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [p for p in (ROOT / "kvserve").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
             and "__pycache__" not in p.parts]
    assert any(p.suffix == ".c" for p in files)  # the check sees the kernel sources
    missing = []
    for p in files:
        rel = p.relative_to(ROOT)
        ok = False
        for pkg, patterns in declared.items():
            pkg_dir = ROOT / Path(*pkg.split("."))
            if pkg_dir in p.parents:
                sub = str(p.relative_to(pkg_dir))
                ok |= any(fnmatch.fnmatch(sub, pat) for pat in patterns)
        if not ok:
            missing.append(str(rel))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"

"""The wheel: `python -m build` makes one that holds the package data, and installed into a
fresh venv it runs `adainfer --help` from there, not from this checkout.

The build runs without isolation (this venv's setuptools) and the install with --no-deps, the
fresh venv seeing this venv's dependencies through a .pth file: no download, so CI can run it
offline, in about 10 s. Skipped where the `build` package is missing (`pip install -e
'.[dev]'` brings it)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build")

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT))
    (found,) = out.glob("adainfer-*.whl")  # the sdist is built too, and the wheel from it
    return found


def test_the_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "adainfer/data/words.txt" in names
    assert "adainfer/lmeval_tasks/adainfer_sst2.yaml" in names
    assert "adainfer/lmeval_tasks/_adainfer_mmlu_template" in names  # an include without .yaml
    assert not [n for n in names if n.startswith(("tests/", "bench/", "results/"))]


def test_installed_in_a_fresh_venv_it_runs_from_there(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", wheel)
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    # the dependencies (torch, transformers, ...) from this venv; adainfer itself from the wheel
    deps = Path(purelib.stdout.strip()) / "_adainfer_test_deps.pth"
    deps.write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run(python, "-c", "import adainfer; print(adainfer.__file__)", cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    shown = run(venv / "bin" / "adainfer", "--help", cwd=tmp_path, env=env).stdout
    assert "lm-eval" in shown and "demo" in shown

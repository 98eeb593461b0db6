"""The wheel that ``pip wheel .`` builds: ``jsoftmax/`` with ``py.typed`` and nothing else.

It is built once per module (hatchling from the test environment, no build isolation, so no
network), then installed into a fresh virtual environment and run there. The fresh
environment gets its dependencies from the test environment's own site-packages through a
``.pth`` line rather than from an index: the test must not depend on the network, and
installing jaxlib again would take a minute. What a resolver would install is checked on the
wheel's metadata instead: the runtime requirements must be exactly those of pyproject.toml.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import jsoftmax

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jsoftmax"
WORKED_EXAMPLE = """
import jax, jax.numpy as jnp, jsoftmax as jsm
loss, grad = jax.value_and_grad(jsm.fused_cross_entropy)(jnp.array([4.0, -4.0, 3.0]), jnp.array(2))
print(jsm.__file__)
print(f"{float(loss):.7f}", " ".join(f"{float(g):.8g}" for g in grad))
print(jsm.cross_entropy(jnp.array([4.0, -4.0, 3.0]), jnp.array(2)))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("jsoftmax-*.whl")
    return path


def _package_files() -> set[str]:
    tracked = subprocess.run(
        ["git", "ls-files", "jsoftmax"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if tracked.returncode == 0 and tracked.stdout.strip():
        return set(tracked.stdout.split())
    return {  # not a git checkout: every source file of the package
        p.relative_to(REPO).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_wheel_holds_the_package_and_its_metadata_only(wheel):
    dist_info = f"jsoftmax-{jsoftmax.__version__}.dist-info/"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(dist_info + "METADATA").decode()
        entry_points = z.read(dist_info + "entry_points.txt").decode()
    assert [n for n in names if not n.startswith(("jsoftmax/", dist_info))] == []
    assert {n for n in names if n.startswith("jsoftmax/")} == _package_files()
    assert "jsoftmax/py.typed" in names
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.M)
    assert [r for r in requires if "extra ==" not in r] == project["dependencies"]
    assert f"Requires-Python: {project['requires-python']}" in metadata
    assert "jsoftmax-verify = jsoftmax._cli:main" in entry_points


def test_wheel_installs_into_a_fresh_venv_and_computes_the_worked_example(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
        + ["--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # jax, jaxlib, numpy and the rest, from this environment; listed after the fresh
    # site-packages, whose jsoftmax therefore comes first. (A directory named in a .pth file
    # is put on the path without running the .pth files inside it, such as the editable
    # install of the checkout.)
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run = subprocess.run(
        [str(python), "-I", "-c", WORKED_EXAMPLE],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    where, loss_and_grad, reference = run.stdout.splitlines()
    assert Path(where).is_relative_to(site / "jsoftmax")
    assert loss_and_grad == "1.3135068 0.73087937 0.00024518272 -0.73112452"
    assert reference.startswith("1.31350")

"""The package as users get it: build the wheel, install it alone, import every module from it.

pyproject.toml maps three source folders into one package (flexcomp/ -> flexcomp, codegen/ ->
flexcomp.codegen, masks/ -> flexcomp.masks), so a module or subpackage that the build leaves out
is invisible to every other test: in a checkout the source folders (or an editable install's
finder) supply it. Here the wheel is built with pip from a copy of the sources, installed with
``pip install --no-deps --target``, and a child Python that cannot see the checkout (run outside
it, ``-I``, with the checkout off sys.path and setuptools' editable-install finders removed)
imports every ``.py`` file of the three folders under its module name and checks that each comes
from the installed copy, and that ``py.typed`` ships.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.package

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package name, as [tool.setuptools.package-dir] in pyproject.toml maps them
SOURCE_DIRS = {"flexcomp": "flexcomp", "codegen": "flexcomp.codegen", "masks": "flexcomp.masks"}


def source_modules() -> list[str]:
    """The module name of every .py file under the three source folders (packages by __init__.py)."""
    names = []
    for folder, package in SOURCE_DIRS.items():
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = Path(dirpath).relative_to(ROOT / folder).parts
            for f in sorted(filenames):
                if f.endswith(".py"):
                    stem = () if f == "__init__.py" else (f[:-3],)
                    names.append(".".join((package, *rel, *stem)))
    return names


def _build_requirements_met() -> bool:
    """Whether this environment already has pyproject's build requirements (setuptools): then pip
    builds without an isolated build environment, so with no network and in seconds."""
    try:
        import tomllib

        from packaging.requirements import Requirement

        reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
        return all(Requirement(r).specifier.contains(metadata.version(Requirement(r).name), prereleases=True)
                   for r in reqs)
    except Exception:  # noqa: BLE001 - Python 3.10, no packaging, a requirement not installed: isolate
        return False


def _pip(*args: str, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"pip {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from the sources, installed alone into a fresh folder (returned)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy (the root's files and the three source folders): the checkout gets no build/
    # or *.egg-info, runs in parallel do not share them, and a stale build/lib cannot leak files in.
    src = tmp / "src"
    src.mkdir()
    for p in ROOT.iterdir():
        if p.is_file():
            shutil.copy2(p, src / p.name)
    for folder in SOURCE_DIRS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    in_place = ["--no-build-isolation"] if _build_requirements_met() else []  # else pip fetches setuptools
    _pip("wheel", "--no-deps", "-q", *in_place, "-w", str(dist), str(src), cwd=tmp)
    wheels = list(dist.glob("flexcomp-*.whl"))
    assert len(wheels) == 1, wheels
    site = tmp / "site"
    _pip("install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheels[0]), cwd=tmp)
    return site


_CHILD = textwrap.dedent(r"""
    import importlib, importlib.resources, json, os, sys

    site, root, names = sys.argv[1], os.path.realpath(sys.argv[2]), json.loads(sys.argv[3])

    def in_root(p):
        p = os.path.realpath(p or ".")
        return p == root or p.startswith(root + os.sep)

    # Only the installed copy may supply flexcomp: drop setuptools' editable-install finder and path
    # hook (an editable install of this checkout in the same environment) and any path into the
    # checkout, then put the installed copy first.
    editable = lambda o: "__editable__" in (getattr(o, "__module__", None) or type(o).__module__ or "")
    sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
    sys.path[:] = [site] + [p for p in sys.path if "__editable__" not in p and not in_root(p)]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    assert not [m for m in sys.modules if m.split(".")[0] == "flexcomp"], "flexcomp imported at startup"

    bad = {}
    for name in names:
        try:
            mod = importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - report every module, not only the first
            bad[name] = f"{type(e).__name__}: {e}"
            continue
        f = getattr(mod, "__file__", None)
        if f is None or not os.path.realpath(f).startswith(os.path.realpath(site) + os.sep):
            bad[name] = f"imported from {f}, not from {site}"
    strays = {m: getattr(mod, "__file__", None) for m, mod in list(sys.modules.items())
              if m.split(".")[0] == "flexcomp" and getattr(mod, "__file__", None) is not None
              and in_root(mod.__file__)}
    try:
        typed = importlib.resources.files("flexcomp").joinpath("py.typed").is_file()
    except BaseException:  # noqa: BLE001 - flexcomp itself did not import: reported in bad
        typed = False
    print(json.dumps({"bad": bad, "strays": strays, "py.typed": typed}))
""")


def test_source_walk_finds_the_kernels():
    names = source_modules()
    assert len(names) == len(set(names))
    for n in ("flexcomp", "flexcomp.demo", "flexcomp.codegen", "flexcomp.codegen.kernels",
              "flexcomp.codegen.kernels.forward", "flexcomp.masks", "flexcomp.masks.causal"):
        assert n in names


def test_wheel_ships_every_module_and_py_typed(installed: Path, tmp_path: Path):
    names = source_modules()
    r = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(installed), str(ROOT), json.dumps(names)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["bad"] == {}, "modules missing from the wheel or imported from elsewhere:\n" + "\n".join(
        f"  {k}: {v}" for k, v in got["bad"].items())
    assert got["strays"] == {}, f"modules loaded from the checkout: {got['strays']}"
    assert got["py.typed"], "flexcomp/py.typed is not in the wheel"
    assert (installed / "flexcomp" / "py.typed").is_file()
    # and nothing beside the one package (a discovery gone wrong would add top-level codegen/, masks/)
    assert sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")) == ["flexcomp"]


def test_wheel_requires_numpy(installed: Path):
    """On a CPU the demo runs the kernels in Triton's interpreter, which imports numpy (triton does
    not declare it): a plain ``pip install`` must bring it."""
    dist, = metadata.distributions(path=[str(installed)])
    reqs = [re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower() for r in dist.requires or ()
            if "extra ==" not in r]
    assert "numpy" in reqs, dist.requires

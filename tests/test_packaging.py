"""The package metadata: setup.py declares what vflow imports (issue 29).

Before, setup.py had no ``install_requires``: ``pip show vflow`` listed nothing and the default
``vflow train`` failed with ModuleNotFoundError where tqdm or scikit-learn were missing.
"""

import ast
import importlib.metadata
import os
import runpy
import sys

import setuptools
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# imported by vflow only on request: the Triton GPU kernels (guarded; they come with CUDA
# builds of torch) and the zuko / pyro adapters (extras_require)
OPTIONAL = {"triton", "zuko", "pyro"}


def _setup_kwargs(monkeypatch) -> dict:
    """The keyword arguments setup.py passes to setuptools.setup, without building."""
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("VFLOW_NO_EXT", "1")
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def _imported_top_level_modules() -> set[str]:
    """Top-level modules named by the import statements of vflow/*.py (AST)."""
    names = set()
    folder = os.path.join(ROOT, "vflow")
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".py"):
            continue
        with open(os.path.join(folder, file)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"vflow", "__future__"}


def _pins() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                pins[name.strip().lower()] = version.strip()
    return pins


def test_install_requires_covers_every_module_vflow_imports(monkeypatch):
    requires = [Requirement(r) for r in _setup_kwargs(monkeypatch).get("install_requires", [])]
    declared = {r.name.lower() for r in requires}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(_imported_top_level_modules() - OPTIONAL):
        names = {d.lower() for d in distributions.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"imported by vflow but not in install_requires: {undeclared}"
    assert {"torch", "numpy", "tqdm", "matplotlib", "scikit-learn"} <= declared


def test_install_requires_ranges_accept_the_pinned_requirements(monkeypatch):
    requires = [Requirement(r) for r in _setup_kwargs(monkeypatch).get("install_requires", [])]
    assert requires
    pins = _pins()
    for req in requires:
        assert req.name.lower() in pins, f"{req.name} is not pinned in requirements.txt"
        assert req.specifier.contains(pins[req.name.lower()]), (str(req), pins[req.name.lower()])


def test_every_declared_requirement_is_imported_by_vflow(monkeypatch):
    """No dead weight: each requirement provides a module that vflow/*.py imports."""
    requires = [Requirement(r) for r in _setup_kwargs(monkeypatch)["install_requires"]]
    provided = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provided.setdefault(dist.lower(), set()).add(module)
    imported = _imported_top_level_modules()
    for req in requires:
        assert provided.get(req.name.lower(), set()) & imported, req.name

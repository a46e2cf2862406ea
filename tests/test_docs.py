"""The documentation (issue 31): the README stays short and keeps its quick start, every
relative link and image of README.md and docs/*.md resolves, the command-line reference
matches the parser, the public API is annotated, and the MkDocs site with its API reference
builds with warnings as errors (a broken ``::: vflow.x`` reference or link fails CI)."""

import argparse
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")


def _pages() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------------- README


def test_readme_is_short_and_keeps_the_quick_start():
    text = _read(README)
    assert len(text.splitlines()) <= 250, "README.md: keep it <= 250 lines; move detail to docs/"
    # The quick start is a contract: CI and new users run exactly these.
    install = "pip install -r requirements.txt && pip install -e . --no-build-isolation"
    assert f"{install} && vflow train" in text
    assert "python -m pytest -q" in text
    for page in (
        "installation",
        "training",
        "cli",
        "models",
        "ops",
        "performance",
        "paper",
        "api",
        "changelog",
    ):
        assert f"docs/{page}.md" in text, f"README.md does not link docs/{page}.md"


# -------------------------------------------------------------------------------- links

# [text](target), ![alt](target), and <img src="target">; the target up to a space or ')'
_LINK = re.compile(
    r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img[^>]*\ssrc=\"([^\"]+)\""
)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def relative_links(path: str, anchors: bool = False) -> list[str]:
    """The relative link and image targets of a Markdown file (code blocks and inline code
    left out), without their #anchors unless ``anchors``."""
    text = _FENCE.sub("", _read(path))
    text = re.sub(r"`[^`\n]*`", "", text)
    out = []
    for m in _LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or (target.startswith("#") and not anchors):
            continue  # http:, https:, mailto: ... and same-page anchors
        out.append(target if anchors else target.split("#", 1)[0])
    return out


def github_anchors(path: str) -> set[str]:
    """The heading anchors GitHub gives a Markdown file: lower case, punctuation dropped,
    each space a hyphen. Headings whose GitHub and MkDocs anchors differ (" / ", " - ")
    would fail here or in the strict MkDocs build, which checks MkDocs' anchors."""
    anchors = set()
    for line in _FENCE.sub("", _read(path)).splitlines():
        if m := re.match(r"^#{1,6} (.+)$", line):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_link_finder_sees_links_and_images(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        '[a](x.md#s) ![b](img/y.png) <img src="z.png"> [web](https://e.org) [c](#here)\n'
        "`[not](code.md)`\n```\n[not](block.md)\n```\n"
    )
    assert relative_links(str(page)) == ["x.md", "img/y.png", "z.png"]
    assert relative_links(str(page), anchors=True)[0] == "x.md#s"
    page.write_text("# The ops (`vflow.ops`): 2-D, Fig. 3\n## Tables 2 and 5\n")
    assert github_anchors(str(page)) == {"the-ops-vflowops-2-d-fig-3", "tables-2-and-5"}


def test_every_relative_link_and_image_resolves():
    broken = []
    for page in _pages():
        for link in relative_links(page, anchors=True):
            target, _, anchor = link.partition("#")
            path = os.path.join(os.path.dirname(page), target) if target else page
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {link} (no such file)")
            elif anchor and path.endswith(".md") and anchor not in github_anchors(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {link} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_python_examples_run(tmp_path, monkeypatch):
    """The README's and the docs' Python examples that need no trained run execute as
    written (the ones that load runs/... were run by hand: see the walkthrough)."""
    monkeypatch.chdir(tmp_path)
    ran = 0
    for page in _pages():
        for block in re.findall(r"^```python\n(.*?)^```", _read(page), re.M | re.S):
            if "runs/" in block:
                continue
            exec(compile(block, f"{os.path.relpath(page, ROOT)} example", "exec"), {})
            ran += 1
    assert ran >= 3


def test_every_figure_in_docs_is_shown_somewhere():
    linked = {
        os.path.normpath(os.path.join(os.path.dirname(p), t))
        for p in _pages()
        for t in relative_links(p)
    }
    unused = [
        f
        for f in sorted(os.listdir(DOCS))
        if f.endswith(".png") and os.path.join(DOCS, f) not in linked
    ]
    assert not unused, f"figures in docs/ that no page shows: {unused}"


# -------------------------------------------------------------------------- CLI reference


def test_cli_reference_matches_the_parser():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gen_cli_docs
    finally:
        sys.path.pop(0)
    assert _read(os.path.join(DOCS, "cli.md")) == gen_cli_docs.render(), (
        "docs/cli.md is out of date: run python tools/gen_cli_docs.py"
    )


def test_every_cli_option_is_in_the_reference():
    from vflow.cli import build_parser

    page = _read(os.path.join(DOCS, "cli.md"))
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        assert f"## vflow {name}" in page, f"docs/cli.md has no section for vflow {name}"
        section = page.split(f"## vflow {name}", 1)[1].split("\n## ", 1)[0]
        for action in p._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help") and f"`{opt}`" not in section:
                    missing.append(f"vflow {name} {opt}")
    assert not missing, f"options missing from docs/cli.md: {missing}"


# ------------------------------------------------------------------------ the public API


def public_api():
    """The functions and methods docs/api.md documents, by name."""
    import vflow
    from vflow import ops, transforms
    from vflow.data import load_dataset
    from vflow.evaluate import save_grid
    from vflow.models import FlowPlusPlus, VFlow
    from vflow.train import load_run_model

    api = {"vflow.build": vflow.build, "vflow.load": vflow.load}
    api.update(load_run_model=load_run_model, load_dataset=load_dataset, save_grid=save_grid)
    for cls in (FlowPlusPlus, VFlow):
        for name in (
            "__init__",
            "elbo",
            "forward",
            "bpd",
            "log_prob",
            "sample",
            "initialize",
            "set_backend",
            "set_activation_checkpointing",
        ):
            api[f"{cls.__name__}.{name}"] = getattr(cls, name)
    for name in ops.__all__:
        if inspect.isfunction(getattr(ops, name)):
            api[f"vflow.ops.{name}"] = getattr(ops, name)
    for name in transforms.__all__:
        obj = getattr(transforms, name)
        if inspect.isclass(obj):
            for attr, fn in vars(obj).items():
                if inspect.isfunction(fn) and (attr == "__init__" or not attr.startswith("_")):
                    api[f"vflow.transforms.{name}.{attr}"] = fn
        else:
            api[f"vflow.transforms.{name}"] = obj
    return api


def unannotated(fn) -> list[str]:
    sig = inspect.signature(fn)
    missing = [
        n
        for n, p in sig.parameters.items()
        if n not in ("self", "cls") and p.annotation is inspect.Parameter.empty
    ]
    # __init__ may leave out "-> None" (PEP 484) when its parameters are annotated
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append("return")
    return missing


def test_unannotated_finds_what_is_missing():
    def f(a: int, b, *args, c: str = "", **kw) -> None: ...
    def g(a: int): ...

    assert unannotated(f) == ["b", "args", "kw"] and unannotated(g) == ["return"]


def test_every_public_function_is_annotated():
    api = public_api()
    assert {
        "vflow.build",
        "vflow.load",
        "FlowPlusPlus.bpd",
        "vflow.ops.mixlogistic_coupling",
        "vflow.transforms.zuko_flow",
    } <= set(api)
    missing = {name: m for name, fn in api.items() if (m := unannotated(fn))}
    assert not missing, f"parameters / returns without type hints: {missing}"


def test_api_page_documents_the_public_api():
    page = _read(os.path.join(DOCS, "api.md"))
    for ref in (
        "vflow.build",
        "vflow.load",
        "vflow.models.FlowPlusPlus",
        "vflow.models.VFlow",
        "vflow.ops",
        "vflow.transforms",
    ):
        assert f"::: {ref}\n" in page, f"docs/api.md does not document {ref}"


# -------------------------------------------------------------------------- mkdocs build


def _mkdocs_missing() -> str | None:
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r requirements.txt)"
    return None


def mkdocs_build(root: str, site: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", site],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(_mkdocs_missing() is not None, reason=str(_mkdocs_missing()))
def test_mkdocs_site_builds_with_warnings_as_errors(tmp_path):
    r = mkdocs_build(ROOT, str(tmp_path / "site"))
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    api = _read(str(tmp_path / "site" / "api" / "index.html"))
    for name in (
        "vflow.load",
        "map_location",
        "log_prob",
        "mixlogistic_coupling_inverse",
        "MixLogisticCoupling1d",
    ):
        assert name in api, f"the API reference lacks {name}"


@pytest.mark.skipif(_mkdocs_missing() is not None, reason=str(_mkdocs_missing()))
@pytest.mark.parametrize(
    "page, planted, errors",
    [
        ("api.md", "\n::: vflow.nonexistent\n", ["vflow.nonexistent"]),
        (
            "index.md",
            "\n[a page](no-such-page.md) and ![a figure](no-such-figure.png)\n",
            ["no-such-page.md", "no-such-figure.png"],
        ),
    ],
)
def test_mkdocs_build_fails_on_a_broken_reference(tmp_path, page, planted, errors):
    """The strict build is what catches these: a copy of the docs with faults planted."""
    root = tmp_path / "repo"
    shutil.copytree(DOCS, root / "docs")
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), root)
    os.symlink(os.path.join(ROOT, "vflow"), root / "vflow")
    with open(root / "docs" / page, "a", encoding="utf-8") as f:
        f.write(planted)
    r = mkdocs_build(str(root), str(tmp_path / "site"))
    log = r.stdout + r.stderr
    assert r.returncode != 0 and all(e in log for e in errors), log

"""The package's architecture as checked facts: import-linter contracts (layers, maths never
imports a run job, no cycles), no cross-module private imports, function-level imports only for
slow optional dependencies, and every theory citation resolving to a section of docs/theory.md."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "rectflow"
# Imported inside functions on purpose: slow to import or optional.  Each such import carries a
# comment saying why (checked below).
LAZY_OK = {"ot", "diffusers", "transformers", "sklearn.datasets"}
CITATION = re.compile(r"§(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?")  # "theory §6.3", or a bare "§6.3" beside one


def _modules() -> list[tuple[Path, ast.Module, list[str]]]:
    out = []
    for p in sorted(SRC.rglob("*.py")):
        text = p.read_text()
        out.append((p, ast.parse(text), text.splitlines()))
    return out


def test_import_linter_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    res = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_ruff_finds_nothing():
    """pyflakes (unused or undefined names), syntax errors and import order, as pyproject.toml's
    [tool.ruff.lint] selects them, over the package, tests, benchmarks and docs scripts."""
    exe = Path(sys.executable).with_name("ruff")
    if not exe.exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    res = subprocess.run([str(exe), "check", "--no-cache", "src", "tests", "benchmarks", "docs"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_no_module_imports_another_modules_private_name():
    """Neither the package nor its tests (which use the public API, as users do)."""
    bad = []
    test_trees = [(f, ast.parse(f.read_text()), None) for f in sorted((ROOT / "tests").rglob("*.py")) if f.name != "test_architecture.py"]
    for p, tree, _ in [*_modules(), *test_trees]:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rectflow"):
                bad += [f"{p.relative_to(ROOT)}:{node.lineno} imports {a.name} from {node.module}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno} imports from private module {node.module}")
    assert not bad, "\n".join(bad)


def test_function_level_imports_are_only_slow_optional_ones_with_a_reason():
    bad = []
    for p, tree, lines in _modules():
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            where = f"{p.relative_to(ROOT)}:{node.lineno}"
            if mod not in LAZY_OK:
                bad.append(f"{where}: import of {mod} inside a function (move it to the top of the module)")
            elif "#" not in lines[node.lineno - 1] and not lines[node.lineno - 2].strip().startswith("#"):
                bad.append(f"{where}: lazy import of {mod} without a one-line reason")
    assert not bad, "\n".join(bad)


def _theory_sections() -> set[str]:
    heads = set()
    for line in (ROOT / "docs" / "theory.md").read_text().splitlines():
        m = re.match(r"#{2,3} (\d+(?:\.\d+)?)\.? ", line)
        if m:
            heads.add(m.group(1))
    return heads


def _cited_files() -> list[Path]:
    files = [*SRC.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    return [f for f in files if f.name not in ("theory.md", "test_architecture.py")]


def test_theory_has_numbered_sections_1_to_7():
    assert {str(i) for i in range(1, 8)} <= _theory_sections()


def test_every_theory_citation_resolves_and_no_external_spec_is_cited():
    sections, bad, n = _theory_sections(), [], 0
    for f in _cited_files():
        text = f.read_text()
        for m in CITATION.finditer(text):
            n += 1
            for sec in filter(None, m.groups()):
                if sec not in sections:
                    bad.append(f"{f.relative_to(ROOT)}: '{m.group(0)}' cites a section docs/theory.md does not have")
        if re.search(r"\bSPEC\b", text):
            bad.append(f"{f.relative_to(ROOT)}: cites SPEC, which is not part of the repository (cite 'theory §N')")
    assert n > 50, f"only {n} citations found: the pattern is wrong"
    assert not bad, "\n".join(bad)


MATHS = ("flow", "diffusion", "reflow", "perflow", "models", "data", "images", "engine")


def test_maths_modules_cite_subsections_not_whole_chapters():
    """issue 32: a maths module cites the subsection that holds its formula (``theory §6.3``), not a chapter of hundreds of
    lines; package overviews (``__init__.py``) may name a chapter."""
    chapter_only = []
    for path, _, lines in _modules():
        rel = path.relative_to(SRC)
        if rel.parts[0] not in MATHS or path.name == "__init__.py":
            continue
        for i, line in enumerate(lines, 1):
            for m in CITATION.finditer(line):
                if any("." not in sec for sec in filter(None, m.groups())):
                    chapter_only.append(f"{rel}:{i} {m.group(0)}")
    assert not chapter_only, f"chapter-only citations in maths modules: {chapter_only}"


def test_the_citation_check_catches_a_missing_section():
    assert "99" not in _theory_sections() and CITATION.search("see theory §99.1").group(1) == "99.1"


def test_readme_layout_table_is_the_real_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| package | modules |"):]
    table = table[: table.index("\n\n")]
    listed: set[str] = set()
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        pkgs = [p.strip("` ") for p in cells[0].split(",")]
        groups = [g.strip() for g in cells[1].split(";")] if cells[1] else []
        for i, pkg in enumerate(pkgs):
            if pkg.endswith(".py"):
                listed.add(pkg)
                continue
            for mod in groups[i if len(groups) > 1 else 0].split(","):
                listed.add(f"{pkg}{mod.strip(' `')}.py")
    real = {str(p.relative_to(ROOT / "src")) for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    assert listed == real, f"in the README but not the tree: {sorted(listed - real)}; in the tree but not the README: {sorted(real - listed)}"


def test_module_names_are_unique_across_the_tree():
    """issue 32: one name, one module (``guidance.py`` three times and ``runs/perflow.py`` beside the ``perflow`` package
    made tracebacks and imports ambiguous)."""
    mods = [p for p in SRC.rglob("*.py") if p.name != "__init__.py"]
    names = [p.stem for p in mods] + [p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    assert sorted({n for n in names if names.count(n) > 1}) == []


MAX_PARAMETERS = 15  # the widest public entry points (sample_images, run_pipeline, train_distill); settings records beyond


def test_no_public_function_takes_more_parameters_than_the_ceiling():
    """Options that travel together are one record (``PairOptions``, ``TrainConfig``), not more keyword arguments."""
    wide = []
    for path, tree, _ in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                n = len(names) - (names[:1] in (["self"], ["cls"]))
                if n > MAX_PARAMETERS:
                    wide.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n})")
    assert not wide, f"public functions with more than {MAX_PARAMETERS} parameters: {wide}"


def test_tests_mirror_the_package_layout():
    for pkg in ("flow", "diffusion", "engine", "reflow", "perflow", "images", "runs", "models", "data"):
        assert (ROOT / "tests" / pkg).is_dir(), f"tests/{pkg}/ is missing"


def test_every_test_named_in_the_guarantees_page_exists():
    text = (ROOT / "docs" / "guarantees.md").read_text()
    refs = re.findall(r"`([\w/]+\.py)(?:::(\w+))?`", text)
    assert len(refs) >= 15
    for path, name in refs:
        f = ROOT / "tests" / path
        assert f.is_file(), f"docs/guarantees.md names tests/{path}, which does not exist"
        if name:
            assert re.search(rf"^def {name}\(", f.read_text(), re.M), f"docs/guarantees.md names {path}::{name}, which does not exist"


def test_import_rectflow_and_the_maths_stay_light():
    """issue 32: `import rectflow` and `import rectflow.flow` load neither the run layer, matplotlib nor diffusers
    (the package's names are imported on first use); every name of __all__ still resolves."""
    import json
    import subprocess
    import sys

    probe = ("import json, sys; import rectflow, rectflow.flow, rectflow.diffusion; "
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('rectflow.runs', 'matplotlib', 'diffusers', 'rectflow.cli')))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert loaded == []
    import rectflow

    for name in rectflow.__all__:
        assert getattr(rectflow, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rectflow.nope  # noqa: B018


def test_subpackages_are_attributes_of_the_lazy_package():
    import subprocess
    import sys

    probe = "import rectflow; print(rectflow.data.make_distribution.__name__, rectflow.flow.solve.__name__, rectflow.errors.ConfigError.__name__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["make_distribution", "solve", "ConfigError"]
    modules = [p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")] + [p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()]
    probe = f"import rectflow; print(all(hasattr(rectflow, m) for m in {sorted(modules)!r}))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "True"  # every module of the root

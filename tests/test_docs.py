"""Documentation examples run as tests, so they cannot rot.

Every ```python block of README.md and docs/*.md runs (blocks of one file share a namespace, in
order) in a temporary working directory; every line of a ```bash block that starts with
`rectflow ` runs through the CLI there too.  A block whose fence line says `no-run` is skipped.
"""

import re
import shlex
from pathlib import Path

import pytest

from rectflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path):
    for lang, info, body in FENCE.findall(path.read_text()):
        if "no-run" not in info:
            yield lang, body


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for lang, body in blocks(path):
        if lang == "python":
            exec(compile(body, f"{path.name}:python", "exec"), namespace)
            ran += 1
        elif lang == "bash":
            for line in body.splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("rectflow "):
                    assert main(shlex.split(line)[1:]) == 0, line
                    ran += 1
    if path.name != "cli.md":
        assert ran, f"{path.name} has no runnable example"


def test_cli_reference_is_current(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli_reference", ROOT / "docs" / "gen_cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("COLUMNS", "100")
    assert (ROOT / "docs" / "cli.md").read_text() == mod.render(), "run: python docs/gen_cli_reference.py"

"""Write docs/cli.md from the argparse parser (tests/test_docs.py checks it is current).

    python docs/gen_cli_reference.py
"""

from __future__ import annotations

import os
from pathlib import Path


def render() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal width
    from rectflow.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = ["# Command-line reference", "", "Generated from the parser by `python docs/gen_cli_reference.py`; do not edit by hand.", ""]
    out += ["```text no-run", parser.format_help().rstrip(), "```", ""]
    for name, p in sub.choices.items():
        out += [f"## rectflow {name}", "", "```text no-run", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    path = Path(__file__).with_name("cli.md")
    path.write_text(render())
    print(f"wrote {path}")

"""Import times of rectflow's entry points, each in a fresh interpreter (best of ``--repeat``), and what each import pulls in
(rectflow modules, matplotlib, diffusers, the run layer).  ``--label`` names the row (e.g. before / after a change); rows
accumulate in ``benchmarks/results/import_time.{md,json}``.

    python benchmarks/import_time.py --label after
"""

from __future__ import annotations

import json
import subprocess
import sys

from _bench import bench_args, write_results
from _machine import machine_info, machine_line

TARGETS = ["rectflow", "rectflow.flow", "rectflow.flow.paths", "rectflow.cli"]
PROBE = """
import json, sys, time
t = time.perf_counter()
import {target}
s = time.perf_counter() - t
mods = set(sys.modules)
print(json.dumps({{"s": s, "rectflow_modules": sum(m.startswith("rectflow") for m in mods), "torch": "torch" in mods,
                  "matplotlib": "matplotlib" in mods, "diffusers": "diffusers" in mods, "runs": "rectflow.runs" in mods}}))
"""


def measure(target: str, repeat: int) -> dict:
    runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE.format(target=target)], capture_output=True, text=True, check=True).stdout)
            for _ in range(repeat)]
    best = min(runs, key=lambda r: r["s"])
    return {"target": target, **best}


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    path = a.out / "import_time.json"
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    rows = [r for r in old["rows"] if r["label"] != a.label] + [{"label": a.label, **measure(t, a.repeat)} for t in TARGETS]
    md = ["# Import times (fresh interpreter, best of 3)", "", machine_line(machine_info()), "",
          "| label | import | seconds | rectflow modules | torch | matplotlib | diffusers | run layer |", "|---|---|---:|---:|---|---|---|---|"]
    md += [f"| {r['label']} | `{r['target']}` | {r['s']:.2f} | {r['rectflow_modules']} | {r['torch']} | {r['matplotlib']} | {r['diffusers']} | {r['runs']} |"
           for r in rows]
    write_results(a.out, "import_time", {"rows": rows, "machine": machine_info()}, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

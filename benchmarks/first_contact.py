"""What a first-time user waits for: `hessops --version`, `--help`, `import hessops`, the README's quick-start,
`hessops demo` and every example's `--quick`, each in a fresh process, with wall and CPU time.

    python -m benchmarks.first_contact                 # everything (about 10 minutes on 2 CPU cores)
    python -m benchmarks.first_contact --only cli import quickstart

Prints a Markdown table for benchmarks/RESULTS.md and writes the numbers as JSON (``--out``). Each command is
run ``--repeats`` times (median reported) after one untimed run that warms the disk cache, so the figures are
those of a second visit, not of a cold disk. Run it on a quiet machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))


def quickstart_source() -> str:
    """The README's first Python block (the quick-start)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    return blocks[0]


def cpu_name() -> str:
    """The processor's model name and family, from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = re.search(r"model name\s*:\s*(.*)", info)
    family = re.search(r"cpu family\s*:\s*(\d+)", info)
    return f"{name.group(1) if name else platform.machine()}, family {family.group(1) if family else '?'}"


def timed(command: list[str], cwd: Path) -> dict[str, float]:
    """Wall and CPU (user + sys of the child) seconds of one run; raises when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu}


def cases(only: set[str], work: Path) -> dict[str, list[str]]:
    """The commands to time, by label."""
    hessops = [PY, "-m", "hessops"]
    quickstart = work / "quickstart.py"
    quickstart.write_text(quickstart_source())
    table = {
        "cli": {
            "hessops --version": [*hessops, "--version"],
            "hessops --help": [*hessops, "--help"],
            "hessops eigs --help": [*hessops, "eigs", "--help"],
        },
        "import": {
            "import hessops": [PY, "-c", "import hessops"],
            "import hessops; hessops.Hessian (torch + CoLA)": [PY, "-c", "import hessops; hessops.Hessian"],
            "import torch": [PY, "-c", "import torch"],
            "import cola": [PY, "-c", "import cola"],
        },
        "quickstart": {"README quick-start": [PY, str(quickstart)]},
        "demo": {
            "hessops demo": [
                *hessops,
                "demo",
                "--out",
                str(work / "demo.json"),
                "--plot",
                str(work / "demo.png"),
                "--no-progress",
            ],
        },
        "examples": {
            f"examples/{name}.py --quick": [
                PY,
                str(ROOT / "examples" / f"{name}.py"),
                "--quick",
                "--out",
                str(work / name),
            ]
            for name in EXAMPLES
        },
    }
    return {label: command for group, commands in table.items() if group in only for label, command in commands.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    groups = ("cli", "import", "quickstart", "demo", "examples")
    parser.add_argument("--only", nargs="+", choices=groups, default=list(groups))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per command (heavy ones: 1)")
    parser.add_argument("--out", type=Path, default=Path("first_contact.json"))
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write the demo's and examples' outputs here (default: a temporary folder)",
    )
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        for label, command in cases(set(args.only), work).items():
            heavy = "demo" in label or "--quick" in label
            repeats = 1 if heavy else args.repeats
            if not heavy:
                timed(command, ROOT)  # warm the disk cache: a second visit, not a cold disk
            runs = [timed(command, ROOT) for _ in range(repeats)]
            rows[label] = {key: statistics.median(r[key] for r in runs) for key in ("wall", "cpu")}
            print(f"{label}: {rows[label]['wall']:.2f} s wall, {rows[label]['cpu']:.2f} s CPU", file=sys.stderr)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": cpu_name(),
        "cores": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "results": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print("| what | wall (s) | CPU (s) |\n| --- | ---: | ---: |")
    for label, row in rows.items():
        print(f"| `{label}` | {row['wall']:.2f} | {row['cpu']:.2f} |")


if __name__ == "__main__":
    main()

"""The module paths of hessops 0.1 (before the package was cut into layers) keep working for one minor
release: each old path imports, warns with a DeprecationWarning naming its new path, and is the new module
itself. Checked in one fresh interpreter, where no old path was imported before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from hessops._moved import MOVED

_CHECK = textwrap.dedent(
    """
    import importlib, json, sys, warnings
    import hessops
    from hessops._moved import MOVED
    report = {}
    for old, new in MOVED.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
        report[old] = {
            "same": module is importlib.import_module(new) and sys.modules[old] is module,
            "spec": module.__spec__.name,
            "warned": any(new in m and old in m for m in messages),
            "attribute": getattr(hessops, old.split(".")[1]) is module,
        }
    print(json.dumps(report))
    """
)


def test_every_old_path_warns_and_is_the_new_module():
    run = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report) == set(MOVED)
    for old, seen in report.items():
        assert seen == {"same": True, "spec": MOVED[old], "warned": True, "attribute": True}, (old, seen)


def test_the_old_paths_are_gone_from_the_package_folder():
    """No file shadows an old path: the finder, not a stale module, answers for each."""
    from pathlib import Path

    import hessops

    root = Path(hessops.__file__).parent
    stale = [old for old in MOVED if (root / (old.split(".", 1)[1].replace(".", "/") + ".py")).exists()]
    assert not stale, stale

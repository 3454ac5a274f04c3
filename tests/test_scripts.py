"""Every script a user or a researcher runs (benchmarks/, experiments/,
examples/) still imports against the package: each is loaded with
``runpy.run_path`` under another name than ``__main__`` (its imports and
module-level code run, its main does not), all in one interpreter."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("benchmarks", "experiments", "examples") for p in (ROOT / folder).rglob("*.py")
                 if not p.name.startswith("test_") and p.name != "conftest.py")

LOAD = """
import runpy, sys, traceback
failed = []
for path in sys.argv[1:]:
    try:
        runpy.run_path(path, run_name="script_import_check")
    except SystemExit:
        pass
    except Exception:
        failed.append(path + "\\n" + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_script_imports():
    assert len(SCRIPTS) > 15
    res = subprocess.run([sys.executable, "-c", LOAD, *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]

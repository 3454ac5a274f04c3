"""Every third-party package the project's code imports is declared in pyproject.toml.

A fresh machine has only what `pip install -e ".[test,hf]"` installs, so a
package that is imported (by the library, the tests, the benchmarks, the
examples or the research scripts) but named in no dependency list is missing
there, however it got onto a developer's machine. This check is static (it
reads the sources with `ast`, imports nothing), so it names the missing package
even where it is installed. `.ci/run` also runs this file as a script before
installing anything: `python tests/test_dependencies.py`.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

try:
    import tomllib  # Python >= 3.11
except ImportError:  # Python 3.10: the check runs on CI's 3.11
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
# The folders whose code a user or CI runs.
SCANNED = ("mars_kernels", "mars", "tests", "benchmarks", "examples", "experiments")
# Import names that differ from the distribution that provides them.
DISTRIBUTION_OF = {
    "pytest_benchmark": "pytest-benchmark",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "cv2": "opencv-python",
}
# Provided by the build itself, not by a dependency list.
BUILD_PROVIDED = {"setuptools"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{normalised distribution name: where it is declared} from [project] and its extras."""
    if tomllib is None:
        import pytest
        pytest.skip("reading pyproject.toml needs tomllib (Python >= 3.11)")
    project = tomllib.loads(pyproject.read_text())["project"]
    where: dict[str, str] = {}
    lists = {"dependencies": project.get("dependencies", [])}
    lists.update({f"extra [{k}]": v for k, v in project.get("optional-dependencies", {}).items()})
    for origin, requirements in lists.items():
        for requirement in requirements:
            name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
            if name is None:
                raise ValueError(f"pyproject.toml: cannot read the requirement {requirement!r} in {origin}")
            where.setdefault(_normalise(name.group(1)), origin)
    return where


def _python_files(root: Path):
    for folder in SCANNED:
        base = root / folder
        if base.is_dir():
            yield from sorted(p for p in base.rglob("*.py") if not any(part.startswith(".") for part in p.parts))


def local_modules(root: Path = ROOT) -> set[str]:
    """Top-level names that resolve to the repository's own files (packages and script helpers)."""
    names = {p.name for p in root.iterdir() if p.is_dir()}
    names |= {p.stem for p in _python_files(root)}
    return names


def imported_modules(path: Path) -> set[str]:
    """Absolute top-level imports of one file, plus pytest.importorskip("name") calls."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value.split(".")[0])
    return found


def undeclared_imports(root: Path = ROOT) -> dict[str, list[str]]:
    """{distribution: [files importing it]} for third-party imports no dependency list names."""
    declared = declared_distributions(root / "pyproject.toml")
    local = local_modules(root)
    missing: dict[str, list[str]] = {}
    for path in _python_files(root):
        for module in imported_modules(path):
            if module in sys.stdlib_module_names or module in local or module in BUILD_PROVIDED:
                continue
            distribution = _normalise(DISTRIBUTION_OF.get(module, module))
            if distribution not in declared:
                missing.setdefault(distribution, []).append(str(path.relative_to(root)))
    return missing


def _report(missing: dict[str, list[str]]) -> str:
    return "\n".join(f"  {dist}: imported by {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
                     for dist, files in sorted(missing.items()))


def test_every_third_party_import_is_a_declared_dependency():
    missing = undeclared_imports()
    assert not missing, ("imported but named in no dependency list or extra of pyproject.toml "
                         "(a fresh install lacks them):\n" + _report(missing))


def test_the_checker_names_a_package_removed_from_an_extra(tmp_path):
    # The check itself must be able to fail: drop hypothesis from the test extra of a copy.
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"hypothesis[^"]*",?\s*', text), "hypothesis is no longer in pyproject.toml"
    (tmp_path / "pyproject.toml").write_text(re.sub(r'"hypothesis[^"]*",?\s*', "", text))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("import hypothesis\nimport numpy\nimport mars_kernels\n"
                                                   "pytest.importorskip('scipy.stats')\n")
    (tmp_path / "mars_kernels").mkdir()
    assert undeclared_imports(tmp_path) == {"hypothesis": ["tests/test_x.py"]}



if __name__ == "__main__":
    problems = undeclared_imports()
    if problems:
        print("error: imported but named in no dependency list or extra of pyproject.toml "
              "(a fresh install lacks them):\n" + _report(problems), file=sys.stderr)
        sys.exit(1)
    print(f"dependencies: every third-party import under {', '.join(SCANNED)} is declared in pyproject.toml")

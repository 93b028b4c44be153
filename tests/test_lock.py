"""requirements/ci.txt, the lock CI installs from (scripts/install.sh, written by scripts/lock.sh):
it pins every third-party package the package and its tests import, and under CI the installed
versions are the pinned ones, so a fresh machine runs the suite with what it was run with."""

import ast
import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "ci.txt"
NOT_LOCKED = {"torch", "tokenratio"}  # torch: pinned by scripts/install.sh (the CPU wheel)


def pins() -> dict[str, str]:
    found = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[_normal(name)] = version.strip()
    return found


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def imported_top_levels() -> set[str]:
    names = set()
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def test_every_imported_package_is_pinned():
    owners = metadata.packages_distributions()
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"tokenratio", "conftest"}
    unpinned = []
    for module in sorted(imported_top_levels() - local):
        for dist in owners.get(module, [module]):
            if _normal(dist) not in pins() and _normal(dist) not in NOT_LOCKED:
                unpinned.append(f"{module} ({dist})")
    assert not unpinned, f"imported but not in {LOCK.name}: {unpinned}; run scripts/lock.sh"


def test_every_pin_names_one_exact_version():
    for name, version in pins().items():
        assert version and all(c not in version for c in "<>=!~* "), (name, version)


@pytest.mark.skipif(not os.environ.get("TOKENRATIO_LOCKED"), reason="only where .ci/run installed")
def test_ci_runs_the_pinned_versions():
    def installed(name: str) -> str | None:
        """What `import` finds first (setuptools appends its vendored copies to sys.path, whose
        metadata a scan of every distribution would also see)."""
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    differ = {n: (v, installed(n)) for n, v in pins().items() if installed(n) != v}
    assert not differ, f"pinned vs installed: {differ}"

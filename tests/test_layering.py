"""The house as built (docs/training.md, "Layout"): every import in src/tokenratio, lazy ones
included, read with `ast`, checked against the layers below. A new import that reaches upward,
into another command's module or into another module's private names fails here."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tokenratio"

# Lowest first. A module may import from its own layer and the layers below, never above.
LAYERS = {
    "core": (  # pure functions, files and settings: torch at most
        "atomic", "baseline", "bregman", "config", "config_print", "formats", "fused_head", "jsonlines",
        "interrupt", "intervals", "logprobs", "losses", "memory", "methods", "model_card", "paths",
        "precision", "provenance",
        "runlog",
    ),
    "data and models": (
        "batch", "checkpoint", "curves", "data", "modeling", "reference", "rundir", "scoring", "shards",
        "sharding", "trunk",
    ),
    "step": ("step",),
    "workflows": ("bench", "eval", "frontier", "integrations", "perf", "study", "tisdpo", "trainer"),
    "cli": ("cli",),
}  # fmt: skip
RANK = {name: rank for rank, names in enumerate(LAYERS.values()) for name in names}
# The loss contract stays importable without any of the machinery around it.
PURE = {
    "tokenratio.losses": {"tokenratio.bregman"},
    "tokenratio.logprobs": {"tokenratio.fused_head"},  # the fused kernels, torch only
    "tokenratio.fused_head": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (SRC / relative).with_suffix(".py").is_file() or (
        SRC / relative / "__init__.py"
    ).is_file()


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every tokenratio import in `path`;
    `from tokenratio import atomic` counts as importing the module tokenratio.atomic."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("tokenratio")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokenratio"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append((child, None) if is_module(child) else (node.module, alias.name))
    return found


def top(name: str) -> str:
    return name.split(".")[1] if name.count(".") else ""


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    unplaced = {top(m) for m in MODULES if m != "tokenratio" and top(m) not in RANK}
    assert not unplaced, f"place {sorted(unplaced)} in LAYERS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_never_reach_upward_or_into_private_names(module):
    upward, private = [], []
    for target, name in imports(MODULES[module]):
        if target == "tokenratio" or module == "tokenratio":
            continue  # the package's lazy public API
        if RANK[top(target)] > RANK.get(top(module), len(LAYERS)):
            upward.append(target)
        same_package = target.rsplit(".", 1)[0] == module.rsplit(".", 1)[0]
        if name and name.startswith("_") and target != module and not same_package:
            private.append(f"{target}.{name}")
    assert not upward, f"{module} imports from a higher layer: {upward}"
    assert not private, f"{module} imports private names: {private}"


def test_no_command_imports_another():
    for module, path in MODULES.items():
        if module.startswith("tokenratio.cli.") and module != "tokenratio.cli.__main__":
            others = {
                t
                for t, _ in imports(path)
                if t.startswith("tokenratio.cli.") and t != "tokenratio.cli.common"
            }
            assert not others, f"{module} imports another command: {sorted(others)}"


def test_the_loss_contract_imports_nothing_of_the_machinery():
    for module, allowed in PURE.items():
        found = {t for t, _ in imports(MODULES[module])} - {module}
        assert found <= allowed, f"{module} imports {sorted(found - allowed)}"


def test_no_import_cycles_between_top_level_modules():
    graph = {}
    for module, path in MODULES.items():
        if module.count(".") == 1:  # tokenratio.x: a module or a subpackage's __init__
            graph[top(module)] = {
                top(t) for t, _ in imports(path) if top(t) and top(t) != top(module)
            }
    for package in {top(m) for m in MODULES if m.count(".") > 1}:
        for module in (m for m in MODULES if top(m) == package):
            graph.setdefault(package, set()).update(
                top(t) for t, _ in imports(MODULES[module]) if top(t) and top(t) != package
            )

    def visit(node, trail):
        if node in trail:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, node])}")
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*trail, node])

    for node in sorted(graph):
        visit(node, [])


def test_a_violation_is_caught(tmp_path):
    """The check itself can fail: an upward import in a core module is reported."""
    bad = tmp_path / "losses.py"
    bad.write_text("from tokenratio.trainer import train\n")
    target, _ = imports(bad)[0]
    assert RANK[top(target)] > RANK["losses"]


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def test_the_readme_stays_a_newcomers_page():
    readme = (SRC.parent / "README.md").read_text().splitlines()
    assert len(readme) <= 200, f"README.md has {len(readme)} lines: move tables to docs/"

"""The house rules a reader relies on: imports run from higher rooms to lower ones, no module grows
past about 600 lines without a reason at its top, and README's Layout names every folder and
module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "uapt"
MAX_LINES = 600
REASON = "Why this size:"  # a module over MAX_LINES says why, in its docstring

# Each module's room, lowest first; a module imports only from rooms below its own (or from
# its own package). A new module gets a line here: where it sits in the flow is a decision.
ROOMS: dict[int, tuple[str, ...]] = {
    0: ("errors", "paths", "distributed", "arith", "bootstrap"),  # no uapt import at all
    1: ("schema", "files", "console", "provenance"),  # + what code made a run (git)
    2: ("ifeval", "smollm2", "sections", "run_lock", "inputs", "sweeps", "devices"),  # sections:
    3: ("records", "objectives", "data", "models"),  # every config section, on the schema only
    4: (
        "launch",
        "run_folder",
        "diff",
        "fsdp",
        "packing",
        "batches",
        "teacher_cache",
        "evaluation",
    ),
    5: ("checkpoint", "tracking", "table", "costs"),  # costs: what a run will cost (plans)
    6: ("loop", "pricing"),  # the training step and the loop around it; what planned runs cost
    7: ("config", "tune"),  # the edge: a whole run's config, tuning sweeps
    8: ("wandb_report", "plan"),  # a study in W&B; the plan and check of a sweep before it runs
    9: ("train", "prepare", "evaluation.cli", "table.cli"),  # entry points (console scripts)
}
ROOM = {name: level for level, names in ROOMS.items() for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py")) if p.parent != SRC.parent}


def room(name: str) -> int:
    """The room of `uapt.<name>`: its own line, else its package's (`evaluation.run`)."""
    while name not in ROOM and "." in name:
        name = name.rsplit(".", 1)[0]
    return ROOM[name]


def uapt_imports(path: Path) -> set[str]:
    """Every uapt module `path` imports, at the top or inside a function (not the imports under
    `if TYPE_CHECKING:`, which never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    known, found = modules(), set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "uapt"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "uapt":
                continue
            for alias in node.names:  # `from uapt import files`: the module uapt.files
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub.removeprefix("uapt.") in known else node.module)
    return {name.removeprefix("uapt.") for name in found if name != "uapt"}


def test_every_module_has_a_room():
    missing = [name for name in modules() if name and _room_or_none(name) is None]
    assert not missing, f"place these modules in ROOMS: {missing}"


def _room_or_none(name: str) -> int | None:
    try:
        return room(name)
    except KeyError:
        return None


@pytest.mark.parametrize("name", sorted(n for n in modules() if n))
def test_imports_run_from_higher_rooms_to_lower_ones(name):
    path = modules()[name]
    if path.name in ("__init__.py", "__main__.py"):
        return  # a package's front door re-exports its own modules (its CLI among them)
    package = name.split(".")[0]
    upward = [
        f"{target} (room {room(target)})"
        for target in sorted(uapt_imports(path))
        if target.split(".")[0] != package and room(target) >= room(name)
    ]
    assert not upward, f"{name} (room {room(name)}) imports from its room or above: {upward}"


def test_the_import_reader_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from uapt import files, paths\n"
        "if TYPE_CHECKING:\n    from uapt.config import RunConfig\n"
        "def f():\n    from uapt.loop import Trainer\n    import uapt.records\n"
    )
    assert uapt_imports(source) == {"files", "paths", "loop", "records"}


@pytest.mark.parametrize("path", sorted([*SRC.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]))
def test_no_module_over_600_lines_without_a_reason(path):
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= MAX_LINES or REASON in doc, (
        f"{path.relative_to(REPO)} has {lines} lines: split it by role, or say at its top "
        f"({REASON!r}) why it stays one file"
    )


def test_readme_layout_names_every_folder_and_module():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w./-]+)`", layout))
    folders = {
        f"{p.name}/"
        for p in REPO.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED
    }
    wanted = set(folders)
    for name, path in modules().items():
        if path.name == "__init__.py":
            wanted |= {f"{name.replace('.', '/')}/"} if name else set()
        elif path.name != "__main__.py":
            wanted.add(f"{name.replace('.', '/')}.py")
    missing = sorted(w for w in wanted if w not in named)
    assert not missing, f"README's Layout does not name: {missing}"


IGNORED = {"runs", "build", "dist", "wandb", "outputs", "multirun", "node_modules"}


def private_imports(path: Path) -> list[str]:
    """`from <uapt module> import _name` and `<uapt module>._name`: another module's private
    names, at the top or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules_bound, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "uapt":
            found += [f"{node.module}.{a.name}" for a in node.names if _private(a.name)]
            modules_bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules_bound |= {a.asname or a.name for a in node.names if a.name.startswith("uapt")}
    for node in ast.walk(tree):
        value = node.value if isinstance(node, ast.Attribute) else None
        if isinstance(value, ast.Name) and value.id in modules_bound and _private(node.attr):
            found.append(f"{value.id}.{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("name", sorted(n for n in modules() if n))
def test_no_module_uses_another_modules_private_names(name):
    found = private_imports(modules()[name])
    assert not found, f"{name} uses private names of other modules: {found} (make them public)"


def test_the_private_name_reader_sees_imports_and_attributes(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from uapt import files\nfrom uapt.table.values import _canon, line_of\n"
        "def f():\n    return files._tmp(), files.publish, self._own\n"
    )
    assert private_imports(source) == ["uapt.table.values._canon", "files._tmp"]

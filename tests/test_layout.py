"""The house rules a reader relies on: no import cycle among uapt's modules, imports run from
higher rooms to lower ones, no module grows past about 600 lines without a reason at its top, and
README's Layout names every folder and module, lower layers first."""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Collection, Iterable, Mapping
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
    8: ("wandb_report", "plan"),  # a study's W&B workspace; the plan and check of a sweep
    9: ("train", "prepare", "evaluation.cli", "table.cli"),  # entry points (console scripts)
}
ROOM = {name: level for level, names in ROOMS.items() for name in names}


def modules(root: Path = SRC) -> dict[str, Path]:
    """Every module of the package at `root`, by its dotted name: `uapt.table.cli`; a package is
    its `__init__.py` (`uapt.table`)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def packages_above(name: str) -> list[str]:
    """`uapt.table.cli` -> [`uapt`, `uapt.table`]: the packages Python runs before the module."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports(name: str, path: Path, known: Collection[str]) -> set[str]:
    """The modules among `known` that running module `name` (the file `path`) imports: at the top
    or inside a function (a lazy import still runs), relative imports resolved, `from pkg import
    mod` as the module `pkg.mod`; not those under `if TYPE_CHECKING:`, which never run. Importing
    `pkg.mod` runs `pkg/__init__.py` first: that is an import of `pkg` too, unless `name` is
    inside `pkg` (then `pkg` is already running)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import x`, `from ..y import z`
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    running = {name, *packages_above(name)}
    found = set()
    for target in targets & set(known):
        found |= {p for p in packages_above(target) if p not in running}
        found.add(target)
    return found - {name}


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """module -> the modules it imports, for every module of the package at `root`."""
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """One cycle of `graph` as a path that ends where it starts (`a -> b -> a`), else []."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        done.add(path.pop())
        return []

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return []


def assert_no_import_cycle(root: Path = SRC) -> None:
    cycle = find_cycle(import_graph(root))
    assert not cycle, (
        "import cycle (lazy imports count: move what both need to the lower module): "
        + " -> ".join(cycle)
    )


@functools.cache
def src_graph() -> dict[str, set[str]]:
    return import_graph(SRC)


def test_no_import_cycle():
    assert_no_import_cycle()


def plant(root: Path, sources: Mapping[str, str]) -> Path:
    for name, text in sources.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_cycle_checker_finds_a_planted_cycle(tmp_path):
    """The shape of the cycles it once missed: a package whose `__init__` imports its CLI, the
    CLI importing (lazily) a module that imports one of the package's modules."""
    pkg = plant(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low.py": "from pkg.sub.values import X\n",
            "pkg/sub/__init__.py": "from .cli import main\n",
            "pkg/sub/values.py": "X = 1\n",
            "pkg/sub/cli.py": "from . import values\ndef main():\n    from pkg import low\n",
        },
    )
    assert find_cycle(import_graph(pkg)) == ["pkg.low", "pkg.sub", "pkg.sub.cli", "pkg.low"]
    with pytest.raises(AssertionError, match=r"pkg\.low -> pkg\.sub -> pkg\.sub\.cli -> pkg\.low"):
        assert_no_import_cycle(pkg)


def test_the_cycle_checker_passes_a_package_importing_its_own_modules(tmp_path):
    pkg = plant(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import main\n",
            "pkg/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub\n",
            "pkg/sub/__init__.py": "from .cli import main\nfrom .values import X\n",
            "pkg/sub/values.py": "from pkg import low\nX = 1\n",
            "pkg/sub/cli.py": "from pkg.sub.values import X\ndef main():\n    from ..sub import values\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.sub.cli"] == {"pkg.sub.values"}  # pkg.sub: already running
    assert graph["pkg.sub.values"] == {"pkg.low"} and graph["pkg.low"] == set()
    assert find_cycle(graph) == []
    assert_no_import_cycle(pkg)


def test_the_import_reader_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from uapt import files, paths\n"
        "if TYPE_CHECKING:\n    from uapt.config import RunConfig\n"
        "def f():\n    from uapt.loop import Trainer\n    import uapt.records\n"
        "    from uapt.evaluation.run import result_rows\n"
    )
    assert imports("probe", source, modules()) == {
        "uapt",  # outside the package, importing any of its modules runs its __init__
        "uapt.files",
        "uapt.paths",
        "uapt.loop",
        "uapt.records",
        "uapt.evaluation.run",
        "uapt.evaluation",  # its package's __init__ runs first
    }


def room(name: str) -> int:
    """The room of `uapt.<name>`: its own line, else its package's (`uapt.evaluation.run`)."""
    name = name.removeprefix("uapt.")
    while name not in ROOM and "." in name:
        name = name.rsplit(".", 1)[0]
    return ROOM[name]


def _room_or_none(name: str) -> int | None:
    try:
        return room(name)
    except KeyError:
        return None


def test_every_module_has_a_room():
    missing = [name for name in modules() if name != "uapt" and _room_or_none(name) is None]
    assert not missing, f"place these modules in ROOMS: {missing}"


def _package(name: str) -> str:
    return name.split(".")[1] if "." in name else name


@pytest.mark.parametrize("name", sorted(n for n in modules() if n != "uapt"))
def test_imports_run_from_higher_rooms_to_lower_ones(name):
    graph = src_graph()
    upward = [
        f"{target} (room {room(target)})"
        for target in sorted(graph[name] - {"uapt"})
        if _package(target) != _package(name) and room(target) >= room(name)
    ]
    assert not upward, f"{name} (room {room(name)}) imports from its room or above: {upward}"


@pytest.mark.parametrize("path", sorted([*SRC.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]))
def test_no_module_over_600_lines_without_a_reason(path):
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= MAX_LINES or REASON in doc, (
        f"{path.relative_to(REPO)} has {lines} lines: split it by role, or say at its top "
        f"({REASON!r}) why it stays one file"
    )


def readme_layout() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme.split("## Layout", 1)[1].split("\n## ", 1)[0]


def layout_entry(name: str, path: Path) -> str:
    """How the Layout names a module: `table/` (a package), `table/cli.py`."""
    relative = name.removeprefix("uapt").lstrip(".").replace(".", "/")
    return f"{relative}/" if path.name == "__init__.py" else f"{relative}.py"


def test_readme_layout_names_every_folder_and_module():
    named = set(re.findall(r"`([\w./-]+)`", readme_layout()))
    folders = {
        f"{p.name}/"
        for p in REPO.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED
    }
    wanted = set(folders)
    for name, path in modules().items():
        if name != "uapt" and path.name != "__main__.py":
            wanted.add(layout_entry(name, path))
    missing = sorted(w for w in wanted if w not in named)
    assert not missing, f"README's Layout does not name: {missing}"


def test_readme_layout_lists_lower_layers_first():
    """A module the Layout lists never imports one it lists later (a package's `__init__` may
    import its own modules, listed under it): read top-down, the Layout is the layering."""
    by_entry = {layout_entry(n, p): n for n, p in modules().items() if n != "uapt"}
    listed = [
        by_entry[e]
        for e in re.findall(r"^\s*- `([\w/.]+)`", readme_layout(), re.M)
        if e in by_entry
    ]
    position = {name: i for i, name in enumerate(listed)}
    graph = src_graph()
    later = [
        f"{name} imports {target}"
        for name in listed
        for target in sorted(graph[name])
        if position.get(target, -1) > position[name] and not target.startswith(f"{name}.")
    ]
    assert not later, f"README's Layout lists a module before one it imports: {later}"


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


@pytest.mark.parametrize("name", sorted(n for n in modules() if n != "uapt"))
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

"""What makes two runs different: `uapt-diff <run> <run>`, and the plan's "why new" line.

    uapt-diff runs/tiny-arith-mle-r0-l0-s0-1a2b3c4d5e runs/tiny-arith-mle-r0-l0-s0-9f8e7d6c5b
    uapt-diff 1a2b3c4d5e 9f8e7d6c5b --runs runs      # by run id (or slug-id) under --runs

Prints the semantic keys whose values differ (`trainer.lr: 0.0001 → 2e-05`, content fingerprints
as `inputs.dataset.source: sha256:… → sha256:…`: the keys a run id hashes, uapt.records), then the
package versions, the git commits and every key of the records' `provenance` that differ,
nested keys dotted. Exit status 0 when the two runs are the same in all of these, 1 when they
differ (as diff(1)), 2 when a run cannot be found or read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uapt import files, records
from uapt.errors import UserError

Change = tuple[str, Any, Any]  # (dotted key, first run's value, second run's value)
ABSENT = object()  # a key one side does not have


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: plain value}; a mapping's keys are joined with dots, other values are leaves
    (lists included: a list differs as a whole)."""
    if not isinstance(node, Mapping) or (prefix and not node):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changes(first: Any, second: Any, prefix: str = "") -> list[Change]:
    """The dotted keys whose values differ between two (nested) values, in key order."""
    a, b = flatten(first, prefix), flatten(second, prefix)
    keys = sorted(set(a) | set(b))
    return [
        (k, a.get(k, ABSENT), b.get(k, ABSENT))
        for k in keys
        if a.get(k, ABSENT) != b.get(k, ABSENT)
    ]


def semantic_changes(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[Change]:
    """The semantic keys (what a run id hashes) whose values differ between two run configs."""
    return changes(records.semantic_config(first), records.semantic_config(second))


def show_value(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def show(change: Change) -> str:
    key, old, new = change
    return f"{key}: {show_value(old)} → {show_value(new)}"


# ----------------------------------------------------------------------------- uapt-diff
def find_run(name: str, runs_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A run folder (or its run.json), or a run id / slug-id / unique prefix under runs_dir."""
    path = Path(name).expanduser()
    if path.name == "run.json":
        path = path.parent
    if not path.is_dir():
        matches = sorted(
            p
            for p in (runs_dir.glob("*") if runs_dir.is_dir() else [])
            if (p / "run.json").is_file()
            and (p.name.startswith(name) or p.name.endswith(f"-{name}"))
        )
        if len(matches) != 1:
            found = "no run" if not matches else f"{len(matches)} runs"
            raise UserError(f"{name}: {found} of that name, id or folder under {runs_dir}")
        path = matches[0]
    try:
        record = records.read_record(path)
    except files.DamagedFile as e:
        raise UserError(str(e)) from None
    if record is None or not isinstance(record.get("config"), Mapping):
        raise UserError(f"{path}: no run record with a config (run.json)")
    return path, record


def record_changes(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, list[Change]]:
    """Every difference uapt-diff reports, by section."""
    return {
        "semantic config": semantic_changes(first["config"], second["config"]),
        "versions": changes(first.get("versions") or {}, second.get("versions") or {}, "versions"),
        "git commit": changes(first.get("git_commit"), second.get("git_commit"), "git_commit"),
        "provenance": changes(
            first.get("provenance") or {}, second.get("provenance") or {}, "provenance"
        ),
    }


def report(names: tuple[str, str], found: dict[str, list[Change]]) -> str:
    lines = [f"uapt-diff {names[0]} {names[1]}"]
    for section, items in found.items():
        lines.append(f"{section}: " + (f"{len(items)} differ" if items else "same"))
        lines += [f"  {show(c)}" for c in items]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="uapt-diff", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs=2, help="run folders, or run ids / slug-ids under --runs")
    p.add_argument(
        "--runs", dest="runs_dir", type=Path, default=Path("runs"), help="where ids are looked up"
    )
    args = p.parse_args(argv)
    try:
        (a, first), (b, second) = (find_run(n, args.runs_dir) for n in args.runs)
    except UserError as e:
        print(f"uapt-diff: {e}", file=sys.stderr)
        return 2
    found = record_changes(first, second)
    print(report((a.name, b.name), found))
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which code made a table's runs (uapt.provenance): notes on a cell whose runs come from
different commits, uncommitted changes or package versions, on the commits a whole table spans,
and on every run made from a dirty tree, by name.

A record made before provenance was kept says only `git_commit` ("<sha>" or "<sha>-dirty"): its
commit and whether the tree was dirty are known, what the changes were is not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from uapt import provenance
from uapt.records import Run

SHOWN_RUNS = 12  # dirty runs named in a note, then "and N more"


def _versions(run: Run) -> Mapping[str, Any]:
    found = run.data.get("versions")
    return found if isinstance(found, Mapping) else {}


def code_differences(a: Run, b: Run) -> list[str]:
    """The keys in which two runs' code differs: commit, dirty, diff_sha256, versions.<pkg>."""
    keys = [key for key, _, _ in provenance.differences(a.data, b.data, provenance.CODE_KEYS)]
    va, vb = _versions(a), _versions(b)
    keys += [f"versions.{k}" for k in sorted(va.keys() | vb.keys()) if va.get(k) != vb.get(k)]
    return keys


def code_label(run: Run, versions: Sequence[str] = ()) -> str:
    """The short name of a run's code: `3b3784b`, `d763d68-dirty` (no diff kept), `d763d68+diff
    1f2e3d4c` (the SHA-256 of its code.diff), `unknown` (no commit recorded); then the
    given versions.<pkg> keys' values."""
    prov = provenance.of_record(run.data)
    commit = prov.get("commit")
    label = str(commit)[:7] if commit else "unknown"
    if commit and prov.get("diff_sha256"):
        label += f"+diff {str(prov['diff_sha256'])[:8]}"
    elif commit and prov.get("dirty"):
        label += "-dirty"
    for key in versions:
        label += (
            f" {key.removeprefix('versions.')} {_versions(run).get(key.removeprefix('versions.'))}"
        )
    return label


def cell_note(where: str, runs: Sequence[Run]) -> str | None:
    """Say when a cell pools runs of different code, naming each run's code."""
    if len(runs) < 2:
        return None
    keys = list(dict.fromkeys(k for r in runs[1:] for k in code_differences(runs[0], r)))
    if not keys:
        return None
    shown = [k for k in keys if k.startswith("versions.")]
    labels = "; ".join(f"{r.name}: {code_label(r, shown)}" for r in runs)
    return f"{where} pools runs of different code (differing in {', '.join(keys)}): {labels}."


def table_notes(runs: Sequence[Run]) -> list[str]:
    """The commits the table's runs span (when more than one) and the runs from a dirty tree."""
    notes = []
    commits = Counter(
        str(provenance.of_record(r.data).get("commit") or "unknown")[:7] for r in runs
    )
    if len(commits) > 1:
        counted = ", ".join(f"{c} ({n})" for c, n in sorted(commits.items()))
        notes.append(
            f"The {len(runs)} runs come from {len(commits)} commits (runs per commit): {counted}; "
            "a delta between cells of different commits compares code as well as objectives."
        )
    dirty = sorted(
        (r for r in runs if provenance.of_record(r.data).get("dirty")), key=lambda r: r.name
    )
    if dirty:
        unknown = [r for r in dirty if not provenance.of_record(r.data).get("diff_sha256")]
        named = "; ".join(f"{r.name} ({code_label(r)})" for r in dirty[:SHOWN_RUNS])
        more = f"; and {len(dirty) - SHOWN_RUNS} more" if len(dirty) > SHOWN_RUNS else ""
        why = (
            f"; {len(unknown)} without a saved diff, so what changed is unknown" if unknown else ""
        )
        notes.append(f"Runs from a dirty tree (uncommitted changes{why}): {named}{more}.")
    return notes

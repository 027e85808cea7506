"""What the repository publishes (docs, results, committed run records, fixtures) names no folder
of a machine that made it: no home folder, checkout, temporary folder or its neighbours.

Run records write machine paths relative to uapt's cache (`<cache>/...`) or the home folder
(`~`) (uapt.paths.publishable), and benchmark figures relative to the checkout
(benchmarks/common.publishable); this test keeps what is committed that way."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from uapt import paths

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = ["README.md", "docs", "tests/fixtures"]
TEXT = {".md", ".json", ".jsonl", ".yaml", ".txt", ".csv", ".tex"}
# Homes and temporary folders on any machine, then this machine's home, checkout, the folder
# around the checkout (its neighbours: shared data, other checkouts) and temporary folder.
GENERIC = ["/home/", "/Users/", "/root/", "/tmp/", "/var/tmp/", "/var/folders/", "/private/var/"]


def forbidden() -> list[str]:
    here = [Path.home(), REPO, REPO.parent, Path(tempfile.gettempdir())]
    return sorted({*GENERIC, *(f"{p}/" for p in here if p != Path(p.anchor))})


def published_files() -> list[Path]:
    found = []
    for name in PUBLISHED:
        root = REPO / name
        found += [root] if root.is_file() else sorted(root.rglob("*"))
    return [p for p in found if p.is_file() and p.suffix in TEXT]


# A path starts at a line start, after a space, quote, `=`, `(` or `,`, not inside a word or URL.
START = r"(?<![\w.~:/<>-])"


@pytest.mark.parametrize("path", published_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_path_in_published_files(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    pattern = re.compile(START + "(" + "|".join(map(re.escape, forbidden())) + r")\S*")
    hits = [m.group(0) for m in pattern.finditer(text)]
    assert not hits, f"{path.relative_to(REPO)} names machine paths: {hits[:5]}"


def test_the_check_sees_what_it_is_for():
    pattern = re.compile(START + "(" + "|".join(map(re.escape, forbidden())) + r")\S*")
    for leak in (
        '"cache_dir": "/home/me/.cache/uapt"',
        f"runs_dir={tempfile.gettempdir()}/uapt-x/runs",
        f"student = {REPO}/runs/x",
        f"{REPO.parent}/shared/data/gsm8k/train.jsonl",
    ):
        assert pattern.search(leak), leak
    for fine in ("~/.cache/uapt", "<cache>/models/x", "../shared/data", "https://x.org/tmp/a"):
        assert not pattern.search(fine), fine


def test_records_write_paths_relative_to_the_cache_or_home(tmp_path):
    cache = tmp_path / "cache"
    model = cache / "models" / "smollm2-135m-instruct"
    assert paths.publishable(model, cache) == "<cache>/models/smollm2-135m-instruct"
    assert paths.publishable(cache, cache) == "<cache>"
    assert paths.publishable(Path.home() / ".cache" / "uapt") == "~/.cache/uapt"
    assert paths.publishable("./runs", cache) == "./runs"  # as given
    assert paths.publishable("HuggingFaceTB/SmolLM2-135M-Instruct", cache) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    home = str(Path.home())
    assert paths.publishable_text(f"dataset.source={home}/d.jsonl runs_dir={home}") == (
        "dataset.source=~/d.jsonl runs_dir=~"
    )
    assert paths.publishable_text(f"{home}x/y") == f"{home}x/y"  # another folder

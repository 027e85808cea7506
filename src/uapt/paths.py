"""Where uapt's own files are: the checkout's config tree and grids, and the default cache."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"  # the Hydra config tree (conf/train.yaml and its groups)
SWEEPS_DIR = REPO / "sweeps"  # the grids, their paired variants and tuned settings


def default_cache_dir() -> Path:
    """`$UAPT_CACHE`, else ~/.cache/uapt (conf/train.yaml's `cache_dir` reads the same)."""
    return Path(os.environ.get("UAPT_CACHE") or Path.home() / ".cache" / "uapt").expanduser()


# ----------------------------------------------------------------------------- published paths
# Records are meant to be published: a path of the machine that made them (its home folder, where
# it keeps uapt's cache) means nothing to a reader and shows the machine's layout.
CACHE_MARK = "<cache>"


def publishable(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """A path as a record shows it: inside `cache_dir` as `<cache>/...`, under the home folder as
    `~/...`, anything else (a relative path, a hub id) as given."""
    text = str(path)
    if not Path(text).is_absolute():
        return text
    resolved = Path(text).resolve()
    if cache_dir is not None:
        cache = Path(cache_dir).expanduser().resolve()
        if resolved == cache or cache in resolved.parents:
            return "/".join([CACHE_MARK, *resolved.relative_to(cache).parts])
    return publishable_text(text)


def publishable_text(text: str) -> str:
    """`text` with the home folder written `~` wherever a path starts with it (a command line,
    `key=/home/me/data.jsonl`)."""
    home = str(Path.home())
    if home in ("", "/"):
        return text
    out, start = [], 0
    while (i := text.find(home, start)) >= 0:
        end = i + len(home)
        at_start = i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "._-/~")
        at_end = end == len(text) or text[end] == "/"
        out.append(text[start:i] + ("~" if at_start and at_end else home))
        start = end
    return "".join(out) + text[start:]

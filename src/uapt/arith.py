"""The synthetic in-distribution task: arithmetic word problems in GSM8K's answer format.

Generated deterministically from a seed, so the embedded default needs no download. Answers
end with ``#### <number>`` exactly like GSM8K, so the same scorer works for both.
"""

from __future__ import annotations

import random

NAMES = [
    "Ava",
    "Ben",
    "Chen",
    "Dana",
    "Eli",
    "Fatima",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Kofi",
    "Lena",
]
TRAIN_LIMIT = 20_000  # train rows guaranteed disjoint from every test row
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"]


def _problem(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, gain, loss = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 20)
    kind = rng.randrange(3)
    if kind == 0:
        question = (
            f"{name} has {start} {item}. {name} gets {gain} more and then gives away {loss}. "
            f"How many {item} does {name} have now?"
        )
        mid, final = start + gain, start + gain - loss
        steps = f"{start} + {gain} = {mid}. Then {mid} - {loss} = {final}."
    elif kind == 1:
        boxes, per_box = rng.randint(2, 9), rng.randint(2, 12)
        question = (
            f"{name} buys {boxes} boxes of {item} with {per_box} {item} in each box and already "
            f"had {start}. How many {item} does {name} have in total?"
        )
        mid, final = boxes * per_box, boxes * per_box + start
        steps = f"{boxes} * {per_box} = {mid}. Then {mid} + {start} = {final}."
    else:
        friends = rng.randint(2, 6)
        total = friends * rng.randint(2, 15)
        question = (
            f"{name} shares {total} {item} equally among {friends} friends and then finds {gain} "
            f"more for each friend. How many {item} does each friend get?"
        )
        mid, final = total // friends, total // friends + gain
        steps = f"{total} / {friends} = {mid}. Then {mid} + {gain} = {final}."
    return {"question": question, "answer": f"{steps}\n#### {final}"}


def arith_rows(n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` problems as ``{"question", "answer"}`` rows; splits draw from disjoint streams."""
    if split not in ("train", "test"):
        raise ValueError(f"arith split must be 'train' or 'test', got {split!r}")
    if split == "train" and n > TRAIN_LIMIT:
        raise ValueError(f"arith offers at most {TRAIN_LIMIT} train rows, asked for {n}")
    rng = random.Random(f"uapt-arith-{split}-{seed}")
    rows, seen = [], set()
    # Test questions never occur among the first TRAIN_LIMIT train questions of the same seed,
    # so held-out accuracy is not measured on rows a run trained on.
    banned = {r["question"] for r in arith_rows(TRAIN_LIMIT, seed)} if split == "test" else set()
    while len(rows) < n:
        row = _problem(rng)
        if row["question"] in seen or row["question"] in banned:
            continue
        seen.add(row["question"])
        rows.append(row)
    return rows

"""A run's numbers depend on its config, never on how the global batch is split.

The same config (global batch 8) is trained for a few steps as accumulation x micro-batch of
8x1, 4x2 and 1x8 in one process, packed (no padding) and split by a token budget, and as 2 ranks
x micro-batch 4 under DDP and FSDP, and DDP packed by a token budget (gloo, two forked
processes), for every named objective on both loss paths. Losses and grad norms per step,
the kept set of every row at every step, and the final weights must agree with the 1x8 run.
The rows differ in length by more than 5x, so any per-micro-batch or per-row mean would show.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import adam_step_bound, assert_weights_close

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "data" / "varied_lengths.jsonl"
STEPS = 3
BATCH = 8
LR = 1e-3
BETAS = (0.9, 0.95)
OBJECTIVES = {
    "mle": ["objective=mle"],
    "masked_mle": ["objective=masked_mle"],
    "masked_mle-batch": ["objective=masked_mle", "objective.scope=batch"],
    "masked_mle_distill": ["objective=masked_mle_distill"],
    "rho1": ["objective=rho1"],
}
PATHS = {"full": 0, "chunked": 16}  # chunk_size 16: several chunks per micro-batch
PACKED = ["trainer.packing=true"]  # rows run as one sequence without padding
BUDGET = [*PACKED, "trainer.max_tokens_per_micro_batch=300"]  # 3-4 micro-batches of <= 300 tokens
# In one process: accumulation x micro-batch, packed, and split by a token budget.
SPLITS = {
    "8x1": (1, []),
    "4x2": (2, []),
    "1x8": (8, []),
    "4x2-packed": (2, PACKED),
    "budget": (8, BUDGET),
}
# 2 ranks x micro-batch 4 (DDP, FSDP), and DDP with packed rows split by a token budget.
RANKED = {"ddp": (False, []), "fsdp": (True, []), "ddp-budget": (False, BUDGET)}


def compose(
    objective: str, path: str, micro: int, cache_dir: Path, fsdp: bool = False, extra=()
) -> dict:
    from helpers import REPO
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [
        "model=tiny",
        "dataset=gsm8k",
        "dataset.name=varied",
        f"dataset.source={FIXTURE}",
        "dataset.val_size=0",
        "logger=none",
        "eval=none",
        *OBJECTIVES[objective],
        f"objective.chunk_size={PATHS[path]}",
        f"trainer.batch_size={BATCH}",
        f"trainer.micro_batch_size={micro}",
        f"trainer.lr={LR}",
        f"trainer.betas=[{BETAS[0]},{BETAS[1]}]",
        "trainer.warmup_steps=0",
        f"trainer.max_steps={STEPS}",
        "trainer.device=cpu",
        f"trainer.fsdp={str(fsdp).lower()}",
        f"cache_dir={cache_dir}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def run_steps(cfg: dict, world) -> dict:
    """Train STEPS steps of `cfg` in this process (one rank of `world`): per step the loss and
    grad norm, the kept positions of every row this rank ran (by global row), the final weights."""
    from uapt import fsdp, train
    from uapt import loop as trainer_loop
    from uapt.config import validate

    cfg = validate(cfg)
    train.seed_everything(cfg.seed, True)
    parts = train.build(cfg, torch.device("cpu"), world)
    stream = train.data_stream(cfg, parts, world)
    train.parallelize(cfg, parts, torch.device("cpu"), world)
    loop = train.make_trainer(cfg, parts, stream, torch.device("cpu"), world)
    kept: dict[tuple[int, int], tuple[int, ...]] = {}
    forward_loss = trainer_loop.forward_loss

    def recording(*args, **kwargs):
        out = forward_loss(*args, **kwargs)
        layout = stream.layout(stream.step_rows(loop.step))[stream.rank]
        micro = recording.calls - recording.first_call[loop.step]
        for row, j in enumerate(layout[micro]):
            kept[loop.step, j] = tuple(out.kept[row].nonzero().flatten().tolist())
        recording.calls += 1
        return out

    recording.calls = 0
    recording.first_call = {}
    trainer_loop.forward_loss = recording
    steps = []
    try:
        for step in range(STEPS):
            recording.first_call[step] = recording.calls
            steps.append(loop.train_step())
    finally:
        trainer_loop.forward_loss = forward_loss
    if fsdp.is_sharded(parts.model):
        weights, _ = fsdp.full_state_dicts(parts.model, loop.optimizer)
    else:
        weights = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    return {
        "loss": [s["loss"] for s in steps],
        "grad_norm": [s["grad_norm"] for s in steps],
        "kept_frac": [s["kept_frac"] for s in steps],
        "kept": kept,
        "weights": weights,
    }


# ----------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def single(cache_dir) -> dict:
    from uapt.distributed import World

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on 2 shared cores
    try:
        return {
            (objective, path, split): run_steps(
                compose(objective, path, micro, cache_dir, extra=extra), World()
            )
            for objective in OBJECTIVES
            for path in PATHS
            for split, (micro, extra) in SPLITS.items()
        }
    finally:
        torch.set_num_threads(threads)


def _rank_worker(rank: int, init_file: str, cache_dir: Path, out: Path) -> None:
    import torch.distributed as dist

    from uapt.distributed import World

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for objective in OBJECTIVES:
            for path in PATHS:
                for kind, (fsdp, extra) in RANKED.items():
                    cfg = compose(objective, path, BATCH // 2, cache_dir, fsdp=fsdp, extra=extra)
                    results[objective, path, kind] = run_steps(cfg, World(rank, 2, rank))
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, cache_dir, single) -> dict:
    """Both ranks' results merged: rank 0's losses and weights, every rank's kept rows."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    # fork: the ranks inherit this process's imports (spawn re-imports them: ~20 s on 2 cores)
    mp.start_processes(
        _rank_worker, args=(str(out / "init"), cache_dir, out), nprocs=2, start_method="fork"
    )
    zero = torch.load(out / "rank0.pt", weights_only=False)
    one = torch.load(out / "rank1.pt", weights_only=False)
    for key, result in zero.items():
        result["kept"] = {**result["kept"], **one[key]["kept"]}
    return zero


# ----------------------------------------------------------------------------- tolerances
# Gradients agree to float32 rounding of reductions over ~1e3 tokens in another order: 1e-5
# relative is 100x that. The same bound holds for the loss, a sum of the same terms.
REL = 1e-5


@pytest.fixture(scope="module")
def initial(cache_dir) -> dict:
    """The tiny model's initial weights (run seed 0, as train.build makes them)."""
    from helpers import tiny_model_cfg

    from uapt.models import load_model, tiny_tokenizer

    torch.manual_seed(0)
    model = load_model(tiny_model_cfg(), tiny_tokenizer(cache_dir), cache_dir, torch.device("cpu"))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_run(got: dict, want: dict, initial: dict, label: str) -> None:
    for key in ("loss", "grad_norm", "kept_frac"):
        assert got[key] == pytest.approx(want[key], rel=REL, abs=1e-7), (label, key)
    assert got["kept"] == want["kept"], (label, "kept sets")
    assert_weights_close(got["weights"], want["weights"], initial, LR, BETAS, STEPS, label)


# ----------------------------------------------------------------------------- tests
def test_fixture_rows_differ_in_length_by_more_than_5x(tiny_tokenizer):
    from uapt.data import build_datasets

    cfg = {"name": "varied", "source": str(FIXTURE), "format": "qa", "val_size": 0}
    train_set, _, _ = build_datasets(cfg, tiny_tokenizer, 0, None)
    lengths = [sum(label != -100 for label in row["labels"]) for row in train_set]
    assert max(lengths) >= 5 * min(lengths)


def test_adam_step_bound_holds_and_is_reached():
    """The bound is reached: gradients +g then -g with b1 = 0.9 give |m_hat / sqrt(v_hat)| at
    step 1 of exactly 1; a brute force over sign patterns never exceeds the bound."""
    assert adam_step_bound(BETAS, 1) == pytest.approx(1.0)
    b1, b2 = BETAS
    for signs in [(1, 1, 1), (1, -1, 1), (-1, 1, 1), (0.001, 0.001, 1), (1, 0.5, 0.25)]:
        m = v = 0.0
        for t, g in enumerate(signs, 1):
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            ratio = abs(m / (1 - b1**t)) / math.sqrt(v / (1 - b2**t))
            assert ratio <= adam_step_bound(BETAS, t) + 1e-12


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_accumulation_splits_match_one_micro_batch(single, initial, objective, path):
    want = single[objective, path, "1x8"]
    for split in SPLITS:
        if split != "1x8":
            got = single[objective, path, split]
            assert_same_run(got, want, initial, f"{objective}/{path}/{split}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kind", RANKED)
def test_two_ranks_match_one_process(single, ranked, initial, objective, path, kind):
    want = single[objective, path, "1x8"]
    got = ranked[objective, path, kind]
    assert_same_run(got, want, initial, f"{objective}/{path}/{kind}")


def test_paths_agree(single):
    """The chunked path computes what the full-logits path does, at every split."""
    for objective in OBJECTIVES:
        for split in SPLITS:
            full, chunked = single[objective, "full", split], single[objective, "chunked", split]
            assert chunked["loss"] == pytest.approx(full["loss"], rel=REL)
            assert chunked["kept"] == full["kept"]


def test_selection_is_not_trivial(single):
    """Masked runs keep K = ceil((1 - rho) n) of each group's n tokens: the comparisons above
    are between real selections, not all-or-nothing masks."""
    for objective, rho in [("masked_mle-batch", 0.5), ("rho1", 0.4), ("masked_mle", 0.5)]:
        run = single[objective, "full", "1x8"]
        # one group of ~500 tokens (scope batch), or 8 rows rounding up by < 1 token each
        assert all(1 - rho <= f < 1 - rho + 8 / 400 for f in run["kept_frac"]), objective


def test_a_non_finite_gradient_norm_is_named_in_the_log(cache_dir, caplog):
    """An overflowing gradient norm makes clipping scale the step to 0: say so, with the step
    (metrics.jsonl only wrote grad_norm "inf", which is how a cached-teacher defect went unseen)."""
    from uapt import train
    from uapt.config import validate
    from uapt.distributed import World

    cfg = validate(compose("mle", "full", BATCH, cache_dir))
    train.seed_everything(cfg.seed, True)
    parts = train.build(cfg, torch.device("cpu"), World())
    stream = train.data_stream(cfg, parts, World())
    loop = train.make_trainer(cfg, parts, stream, torch.device("cpu"), World())
    loop.train_step()
    assert "gradient norm" not in caplog.text  # a finite step says nothing
    weight = next(p for p in parts.model.parameters() if p.requires_grad)
    weight.register_hook(lambda g: torch.full_like(g, 1e30))  # squares overflow fp32: norm inf
    row = loop.train_step()
    assert math.isinf(row["grad_norm"])
    assert "step 2: gradient norm inf; clipping scaled the step's gradients to 0" in caplog.text

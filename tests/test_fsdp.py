"""FSDP2 (uapt.fsdp) on two CPU processes (gloo) against one unsharded process.

One spawn of two ranks runs every sharded scenario and hands rank 0's results back; the reference
is computed here, unsharded, with a naive loop that knows nothing of uapt.fsdp.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_weights_close

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3
ACCUMULATION = 2  # micro-batches per step; ranks split each global micro-batch of MICRO rows
MICRO = 4
SEQ = 12
LR, WEIGHT_DECAY, CLIP = 1e-2, 0.1, 0.5  # a low clip: clipping is active on every step


# ----------------------------------------------------------------------------- shared pieces
def model_cfg(lora: bool = False) -> dict:
    from helpers import tiny_model_cfg

    cfg = tiny_model_cfg()
    if lora:
        cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return cfg


def tiny_llama(cache_dir, seed: int = 0, lora: bool = False) -> torch.nn.Module:
    from uapt.models import load_model, tiny_tokenizer

    torch.manual_seed(seed)
    model = load_model(model_cfg(lora), tiny_tokenizer(cache_dir), cache_dir, torch.device("cpu"))
    return model.train()


def global_batch(vocab: int) -> dict[str, torch.Tensor]:
    """ACCUMULATION x MICRO rows; every row has a different number of labelled tokens, so a
    per-rank or per-row mean instead of the micro-batch token mean changes the loss."""
    gen = torch.Generator().manual_seed(123)
    rows = ACCUMULATION * MICRO
    ids = torch.randint(3, vocab, (rows, SEQ), generator=gen)
    labels = ids.clone()
    for r in range(rows):
        labels[r, : 1 + r] = -100  # prompt tokens: no loss
    return {"input_ids": ids, "labels": labels}


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """As uapt.train.make_optimizer: decay on matrices only (two parameter groups)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LR)


def nll_sum(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="sum", ignore_index=-100
    )


def distill_sum(student, teacher, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL + KL(teacher || student) over labelled positions; the teacher runs between
    the student's forward and backward, as in uapt.loop.forward_loss."""
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
    valid = labels[:, 1:] != -100
    nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum")
    log_p, log_q = target.log_softmax(-1), logits.log_softmax(-1)
    return nll + (log_p.exp() * (log_p - log_q)).sum(-1)[valid].sum()


def micro_rows(k: int, rank: int, world: int) -> slice:
    per = MICRO // world
    return slice(k * MICRO + rank * per, k * MICRO + (rank + 1) * per)


def valid_count(labels: torch.Tensor, k: int) -> int:
    return int((labels[k * MICRO : (k + 1) * MICRO, 1:] != -100).sum())


# ----------------------------------------------------------------------------- two ranks
def _worker(rank: int, init_file: str, cache_dir, out) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from uapt import fsdp
    from uapt.models import frozen_teacher, is_peft, make_teacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict = {}
        model = tiny_llama(cache_dir)
        batch = global_batch(model.config.vocab_size)
        ids, labels = batch["input_ids"], batch["labels"]
        probe = ids[:3]
        with torch.no_grad():
            results["initial_logits"] = model(input_ids=probe).logits
        teacher = fsdp.shard(frozen_teacher(model))
        fsdp.shard(model)
        results["fsdp_classes"] = sorted(
            {type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)}
        )
        results["teacher_is_sharded"] = isinstance(teacher.model.norm.weight, DTensor)
        with torch.no_grad():
            results["teacher_logits"] = teacher(input_ids=probe).logits
        optimizer = make_optimizer(model)
        mixed = fsdp.shard(tiny_llama(cache_dir), mixed_precision=True)
        with torch.no_grad():
            results["bf16_logits"] = mixed(input_ids=probe).logits
        fsdp.reshard(mixed)  # the root keeps its gathered bf16 weights after a no-grad forward
        results["bf16_master_dtype"] = mixed.lm_head.weight.dtype

        def step() -> tuple[float, float]:
            total = torch.zeros(1, dtype=torch.float64)
            for k in range(ACCUMULATION):
                rows = micro_rows(k, rank, WORLD)
                last = k == ACCUMULATION - 1
                with nullcontext() if last else fsdp.no_sync(model):
                    # this rank's share of the global token mean; FSDP averages over ranks
                    loss = nll_sum(model, ids[rows], labels[rows]) / valid_count(labels, k)
                    (loss * WORLD / ACCUMULATION).backward()
                total += loss.detach().double()
            norm = fsdp.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dist.all_reduce(total)
            return float(total) / ACCUMULATION, float(norm)

        results["steps"] = [step() for _ in range(STEPS)]
        with torch.no_grad():
            results["trained_logits"] = model(input_ids=probe).logits

        # checkpoint round trip through the files uapt.checkpoint writes
        model_sd, optim_sd = fsdp.full_state_dicts(model, optimizer)
        results["other_rank_dicts_empty"] = None
        if rank == 0:
            save_file(model_sd, out / "model.safetensors")
            torch.save(optim_sd, out / "optimizer.pt")
        else:
            results["other_rank_dicts_empty"] = model_sd == {} and optim_sd == {}
        dist.barrier()
        fresh = fsdp.shard(tiny_llama(cache_dir, seed=7))
        fresh_optimizer = make_optimizer(fresh)
        loaded = (None, None)
        if rank == 0:
            loaded = (
                load_file(out / "model.safetensors"),
                torch.load(out / "optimizer.pt", weights_only=True),
            )
        fsdp.load_full_state_dicts(fresh, fresh_optimizer, *loaded)
        with torch.no_grad():
            results["restored_logits"] = fresh(input_ids=probe).logits
        # one more step on both: equal only if the optimizer state came back too
        results["next_step"] = step()
        model, optimizer = fresh, fresh_optimizer
        results["restored_next_step"] = step()

        twin = fsdp.unsharded_copy(model, lambda: tiny_llama(cache_dir, seed=9))
        with torch.no_grad():
            results["sharded_final_logits"] = model(input_ids=probe).logits
        if twin is not None:
            results["twin_is_sharded"] = fsdp.is_sharded(twin)
            with torch.no_grad():
                results["twin_logits"] = twin(input_ids=probe).logits

        # LoRA: the root is the transformers model inside peft's wrapper
        # LoRA, with the adapters-off teacher: the root is the transformers model in peft's wrapper
        lora = tiny_llama(cache_dir, lora=True)
        lora_teacher = make_teacher(lora, model_cfg(lora=True))
        fsdp.shard(lora)
        lora_optimizer = make_optimizer(lora)
        rows = micro_rows(0, rank, WORLD)
        results["lora_steps"] = []
        for _ in range(2):
            loss = distill_sum(lora, lora_teacher, ids[rows], labels[rows]) / valid_count(labels, 0)
            (loss * WORLD).backward()
            norm = fsdp.clip_grad_norm_(lora.parameters(), float("inf"))
            lora_optimizer.step()
            lora_optimizer.zero_grad(set_to_none=True)
            dist.all_reduce(loss := loss.detach())
            results["lora_steps"].append((float(loss), float(norm)))
        lora_sd, lora_optim = fsdp.full_state_dicts(lora, lora_optimizer)
        results["forward_loss"] = _sharded_forward_loss(rank, cache_dir, ids, labels)
        results["lora_is_peft"] = is_peft(lora)
        results["lora_keys"] = sorted(lora_sd)
        results["lora_optim_size"] = len(lora_optim.get("state", {}))
        results["lora_names"] = fsdp.trainable_names(lora)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def objective(chunk_size: int) -> dict:
    """masked_mle_distill (top-K per sequence: a rank's rows select alone; the loop's
    selections across ranks are tested in test_invariance.py)."""
    from helpers import REPO
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "objective" / "base.yaml"))
    return {
        **base,
        "name": "masked_mle_distill",
        "mask_ratio": 0.5,
        "distill_weight": 1.0,
        "scope": "sequence",
        "chunk_size": chunk_size,
    }


def loss_and_grad_norm(student, teacher, ids, labels, chunk: int, scale: float, counts) -> list:
    """uapt.loop.forward_loss (the loop's own) with the global batch's counts: total loss,
    backward, global grad norm."""
    from uapt import fsdp
    from uapt.loop import forward_loss
    from uapt.objectives import Objective

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out = forward_loss(student, student, teacher, batch, Objective(objective(chunk)), counts=counts)
    (out.total * scale).backward()
    norm = fsdp.clip_grad_norm_(student.parameters(), float("inf"))
    student.zero_grad(set_to_none=True)
    return [float(out.total.detach()), float(norm)]


def global_counts(labels: torch.Tensor, chunk: int):
    from uapt.objectives import step_counts, valid_mask

    return step_counts(valid_mask(labels), objective(chunk))


def teacher_and_student(cache_dir):
    """A teacher other than the student's initial weights, so that distillation has gradients."""
    from uapt.models import frozen_teacher

    return frozen_teacher(tiny_llama(cache_dir, seed=4)), tiny_llama(cache_dir, seed=3)


def _sharded_forward_loss(rank: int, cache_dir, ids, labels) -> dict:
    """Full-logits and chunked paths of forward_loss on a sharded student and teacher; the
    chunked path applies the output layer itself, after the root's forward."""
    import torch.distributed as dist

    from uapt import fsdp

    teacher, student = teacher_and_student(cache_dir)
    fsdp.shard(teacher)
    fsdp.shard(student)
    rows = micro_rows(0, rank, WORLD)
    results = {}
    for chunk in (0, 8):
        counts = global_counts(labels[:MICRO], chunk)
        loss, norm = loss_and_grad_norm(
            student, teacher, ids[rows], labels[rows], chunk, WORLD, counts
        )
        total = torch.tensor([loss])
        dist.all_reduce(total)  # each rank's loss is its share of the micro-batch token mean
        results[chunk] = [float(total), norm]
    return results


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_tokenizer, cache_dir) -> dict:
    """Rank 0's and rank 1's results from one run of `_worker` on two processes."""
    import torch.multiprocessing as mp

    from uapt import fsdp, train  # noqa: F401 (imported here once, not in each rank)

    tiny_llama(cache_dir, lora=True)  # the same for transformers' Llama and peft
    out = tmp_path_factory.mktemp("fsdp")
    # fork: the ranks inherit this process's imports (spawn re-imports them: ~20 s on 2 cores)
    mp.start_processes(
        _worker,
        args=(str(out / "init"), cache_dir, out),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    results = torch.load(out / "rank0.pt", weights_only=False)
    results["rank1"] = torch.load(out / "rank1.pt", weights_only=False)
    results["dir"] = out
    return results


# ----------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def reference(cache_dir) -> dict:
    """The same steps unsharded in this process: micro-batches of MICRO rows, token means."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on 2 shared cores
    try:
        return _reference(cache_dir)
    finally:
        torch.set_num_threads(threads)


def _reference(cache_dir) -> dict:
    model = tiny_llama(cache_dir)
    batch = global_batch(model.config.vocab_size)
    ids, labels = batch["input_ids"], batch["labels"]
    optimizer = make_optimizer(model)
    steps = []
    for _ in range(STEPS):
        total = 0.0
        for k in range(ACCUMULATION):
            rows = slice(k * MICRO, (k + 1) * MICRO)
            loss = nll_sum(model, ids[rows], labels[rows]) / valid_count(labels, k)
            (loss / ACCUMULATION).backward()
            total += float(loss.detach())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        for g in grads:  # clipping by hand, independent of torch's clip_grad_norm_
            g.mul_(min(1.0, CLIP / (norm + 1e-6)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append((total / ACCUMULATION, norm))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "steps": steps,
        "weights": weights,
        "optimizer": optimizer.state_dict(),
        "lora_steps": _lora_reference(cache_dir, ids, labels),
        "forward_loss": {
            chunk: loss_and_grad_norm(
                *reversed(teacher_and_student(cache_dir)),
                ids[:MICRO],
                labels[:MICRO],
                chunk,
                1,
                global_counts(labels[:MICRO], chunk),
            )
            for chunk in (0, 8)
        },
    }


def _lora_reference(cache_dir, ids: torch.Tensor, labels: torch.Tensor) -> list:
    from uapt.models import make_teacher

    model = tiny_llama(cache_dir, lora=True)
    teacher = make_teacher(model, model_cfg(lora=True))
    optimizer = make_optimizer(model)
    steps = []
    for _ in range(2):
        loss = distill_sum(model, teacher, ids[:MICRO], labels[:MICRO]) / valid_count(labels, 0)
        loss.backward()
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        steps.append((float(loss.detach()), math.sqrt(sum(float(g.pow(2).sum()) for g in grads))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps


# ----------------------------------------------------------------------------- tests
def test_shard_wraps_every_decoder_layer_and_the_root(sharded):
    assert sharded["fsdp_classes"] == ["FSDPLlamaDecoderLayer", "FSDPLlamaForCausalLM"]
    assert sharded["teacher_is_sharded"]


def test_two_sharded_ranks_match_one_process(sharded, reference):
    assert len(sharded["steps"]) == STEPS
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
        zip(sharded["steps"], reference["steps"], strict=True), 1
    ):
        # fp32 sums of the same terms in another order (the ranks' halves, then the all-reduce):
        # rounding ~1e-7 relative per reduction over ~1e2 tokens; 1e-5 leaves 100x room.
        assert loss == pytest.approx(ref_loss, abs=1e-5), ("loss", step)
        assert norm == pytest.approx(ref_norm, abs=1e-5, rel=1e-5), ("grad norm", step)
        assert ref_norm > CLIP  # clipping was in play
    losses = [loss for loss, _ in sharded["steps"]]
    assert losses[-1] < losses[0]


def test_sharded_teacher_gives_the_initial_logits(sharded):
    torch.testing.assert_close(sharded["teacher_logits"], sharded["initial_logits"])


def test_checkpoint_has_the_single_process_format_and_values(sharded, reference, cache_dir):
    from safetensors.torch import load_file

    from uapt.checkpoint import trainable_state

    weights = load_file(sharded["dir"] / "model.safetensors")
    initial = trainable_state(tiny_llama(cache_dir))
    assert sorted(weights) == sorted(initial)
    # AdamW turns rounding differences of near-zero gradients into visible weight differences
    # (1 of 8,192 elements once differed by 1.7e-5): the tolerance follows from the optimizer.
    betas = (0.9, 0.999)  # torch's AdamW defaults, as make_optimizer here uses
    assert_weights_close(weights, reference["weights"], initial, LR, betas, STEPS)
    optim = torch.load(sharded["dir"] / "optimizer.pt", weights_only=True)
    ref = reference["optimizer"]
    assert [g["params"] for g in optim["param_groups"]] == [
        g["params"] for g in ref["param_groups"]
    ]
    assert optim["state"].keys() == ref["state"].keys()
    for i, state in ref["state"].items():
        assert float(optim["state"][i]["step"]) == float(state["step"]) == STEPS
        # m and v are running sums of the gradients and their squares: they differ by the
        # gradients' rounding (~1e-6 relative, as the grad norms); rtol 1e-4 is 100x that,
        # atol covers entries whose gradients cancel to ~0.
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optim["state"][i][key], state[key], atol=1e-6, rtol=1e-4)
    assert sharded["rank1"]["other_rank_dicts_empty"]


def test_restored_model_and_optimizer_continue_identically(sharded):
    # the same weights through the same sharded forward: torch's float32 defaults suffice
    torch.testing.assert_close(sharded["restored_logits"], sharded["trained_logits"])
    # the same step from the same restored state: equal up to the all-reduce's rounding
    assert sharded["restored_next_step"] == pytest.approx(sharded["next_step"], abs=1e-6)


def test_unsharded_copy_on_rank_zero(sharded):
    assert sharded["twin_is_sharded"] is False
    assert "twin_logits" not in sharded["rank1"]
    torch.testing.assert_close(sharded["twin_logits"], sharded["sharded_final_logits"])


def test_bf16_mixed_precision_computes_in_bf16_and_keeps_fp32_weights(sharded):
    assert sharded["bf16_logits"].dtype == torch.bfloat16
    assert sharded["bf16_master_dtype"] == torch.float32
    # bf16 keeps 8 bits of mantissa (relative error 2^-8 ~ 0.004 per rounding); two layers of
    # bf16 matmuls over 64-wide rows accumulate to ~1e-2: 0.05 bounds it, fp32 vs fp32 would
    # be 1e-6, and any real error (unscaled or unsharded weights) is O(1).
    torch.testing.assert_close(
        sharded["bf16_logits"].float(), sharded["initial_logits"], atol=0.05, rtol=0.05
    )


@pytest.mark.parametrize("chunk", [0, 8], ids=["full_logits", "chunked"])
def test_loop_forward_loss_with_sharded_teacher_matches_one_process(sharded, reference, chunk):
    got, want = sharded["forward_loss"][chunk], reference["forward_loss"][chunk]
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)  # as in the steps test: fp32 order
    assert want[1] > 0


def test_lora_with_adapters_off_teacher_matches_one_process(sharded, reference):
    for step, (got, want) in enumerate(
        zip(sharded["lora_steps"], reference["lora_steps"], strict=True), 1
    ):
        assert got == pytest.approx(want, abs=1e-5, rel=1e-5), step  # fp32 sum order


def test_lora_model_stays_peft_and_saves_only_adapters(sharded):
    assert sharded["lora_is_peft"]
    assert sharded["lora_keys"] == sorted(sharded["lora_names"])
    assert sharded["lora_keys"] and all("lora_" in k for k in sharded["lora_keys"])
    assert sharded["lora_optim_size"] == len(sharded["lora_names"])


def test_shard_without_process_group_says_what_to_do(cache_dir):
    from uapt import fsdp

    with pytest.raises(RuntimeError, match="torchrun"):
        fsdp.shard(tiny_llama(cache_dir))

"""The fused head + loss kernel of the chunked path: loss terms and their closed-form gradients chunk by chunk, never [B, T, V] logits in memory.

Everything here is checked against the reference path (uapt.objectives.loss) in value and gradient (tests/test_objectives_chunked.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from uapt.objectives.divergences import (
    TeacherTopK,
    cached_buckets,
    divergence_rows,
    log_softmax_at,
)
from uapt.objectives.head import OutputHead, head_logits
from uapt.objectives.positions import compute_dtype


def _n_rows(t: torch.Tensor | TeacherTopK) -> int:
    return t.nll.shape[0] if isinstance(t, TeacherTopK) else t.shape[0]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) without an [N, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@dataclass(frozen=True)
class FusedConstants:
    """Constants of one fused pass."""

    softcap: float | None
    teacher_softcap: float | None
    divergence: str
    jsd_beta: float
    temperature: float
    distill_weight: float
    chunk: int


# Elementwise work on a chunk's [rows, V] logits runs over blocks of chunk / _BLOCKS_PER_CHUNK
# rows, and the teacher's logits are made chunk / _TEACHER_SPLIT rows at a time, so that
# besides the chunk's student logits only fractions of [chunk, V] are alive (tests change them).
_BLOCKS_PER_CHUNK = 8

_TEACHER_SPLIT = 8


def _ceil_div(a: int, b: int) -> int:
    return max(1, -(-a // b))


def _spans(n_rows: int, step: int) -> list[tuple[int, int]]:
    return [(r0, min(n_rows, r0 + step)) for r0 in range(0, n_rows, step)]


def _divergence_and_grad(
    z: torch.Tensor, t: torch.Tensor, cfg: FusedConstants
) -> tuple[torch.Tensor, torch.Tensor]:
    """div(P, Q) per row and its gradient w.r.t. the student's tempered logits u = z / tau.

    z, t: student and teacher logits (read only). Closed forms (Q = softmax u): forward KL:
    Q - P; reverse KL: Q (log Q - log P - KL(Q||P)); jsd: (1 - beta) Q (log Q - log M - KL(Q||M)).
    """
    tau, low = cfg.temperature, torch.finfo(z.dtype).min
    log_p, log_q = log_softmax_at(t, tau), log_softmax_at(z, tau)
    if cfg.divergence == "forward_kl":
        p = log_p.exp()
        d = _rowdot(p, log_p.sub_(log_q).clamp_(min=low))  # clamp: 0 * log 0 counts 0
        return d, log_q.exp_().sub_(p)
    if cfg.divergence == "reverse_kl":
        diff = log_p.sub_(log_q).neg_()  # log Q - log P
        q = log_q.exp_()
        d = _rowdot(q, diff)
        return d, q.mul_(diff.sub_(d.unsqueeze(1)))
    beta = cfg.jsd_beta
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    p = log_p.exp()
    kl_pm = _rowdot(p, log_p.sub_(log_m).clamp_(min=low))
    del p, log_p
    q = log_q.exp()
    diff = log_q.sub_(log_m)  # log Q - log M
    kl_qm = _rowdot(q, diff)
    d = beta * kl_pm + (1 - beta) * kl_qm
    return d, diff.sub_(kl_qm.unsqueeze(1)).mul_(q).mul_(1 - beta)


def _cached_divergence_and_grad(
    z: torch.Tensor, cached: TeacherTopK, cfg: FusedConstants
) -> tuple[torch.Tensor, torch.Tensor]:
    """div over the buckets of ``cached`` per row and its gradient w.r.t. u = z / tau.

    With g = d div / d log Q~ (autograd on the small [rows, k + 1] tensors) and S = sum_b g_b:
    d div / du_j = g_j - Q_j S for a top-k token j, g_rest Q_j / Q~_rest - Q_j S for any other.
    Q_j / Q~_rest, a token's share of the rest (at most 1), is taken in log space: dividing by a
    rest mass near fp32's rounding of 0 overflows.
    """
    log_q = log_softmax_at(z, cfg.temperature)
    log_pb, log_qb = cached_buckets(log_q, cached)
    with torch.enable_grad():
        leaf = log_qb.detach().requires_grad_()
        d = divergence_rows(log_pb, leaf, cfg.divergence, cfg.jsd_beta)
        (g,) = torch.autograd.grad(d.sum(), leaf)
    total = g.sum(1, keepdim=True)
    k = cached.ids.shape[1]
    q_top = log_q.gather(1, cached.ids).exp_()
    if k < log_q.shape[1]:  # every token as a rest token, then the top-k entries overwritten
        q = log_q.exp()
        grad = log_q.sub_(log_qb[:, k:]).exp_().mul_(g[:, k:]).sub_(q.mul_(total))
    else:
        grad = log_q
    return d.detach(), grad.scatter_(1, cached.ids, g[:, :k] - q_top * total)


def _chunk_terms(
    z: torch.Tensor,
    targets: torch.Tensor,
    mle_w: torch.Tensor,
    t: torch.Tensor | TeacherTopK | None,
    dist_w: torch.Tensor,
    cfg: FusedConstants,
    need_grad: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a chunk: (nll per row, weighted MLE sum, distill sum).

    z [rows, V]: the student's (softcapped) logits; when need_grad it is overwritten in place by
    d(mle + lambda * distill)/d(pre-softcap logits). mle_w: per-row MLE weight (kept /
    denominator). The first len(t) rows are distilled against teacher logits t (or a cached
    TeacherTopK), weighted by dist_w (= 1 / distilled denominator). Elementwise work runs over
    blocks of rows.
    """
    cached = isinstance(t, TeacherTopK)
    n_d = 0 if t is None else _n_rows(t)
    tau, cap = cfg.temperature, cfg.softcap
    # Forward KL at tau = 1 (the default) shares the student's softmax Q with the MLE term: the
    # rows' gradient is Q (w + c) - c P - w onehot, and P lives in z's rows (spent by then).
    share = cfg.divergence == "forward_kl" and tau == 1 and not cached
    low = torch.finfo(z.dtype).min
    coef_d = tau * cfg.distill_weight * dist_w  # d(tau^2 div)/dz = tau d div/du
    nll = z.new_empty(z.shape[0])
    dist_sum = z.new_zeros(())
    for r0, r1 in _spans(z.shape[0], block):
        zb, y, w = z[r0:r1], targets[r0:r1].unsqueeze(1), mle_w[r0:r1].unsqueeze(1)
        log_q = torch.log_softmax(zb, dim=-1)
        nll[r0:r1] = -log_q.gather(1, y).squeeze(1)
        k = max(0, min(r1, n_d) - r0)  # distilled rows in this block
        # z = c tanh(a / c): dz/da = 1 - (z / c)^2, taken before zb is reused.
        dcap = zb.div(cap).square_().neg_().add_(1) if cap and need_grad else None
        extra = None
        if k and share:
            log_p = torch.log_softmax(t[r0 : r0 + k], dim=-1)
            p = torch.exp(log_p, out=zb[:k])  # zb's logits are spent: reuse them for P
            dist_sum += _rowdot(p, log_p.sub_(log_q[:k]).clamp_(min=low)).sum()
            del log_p
        elif k and cached:
            d, extra = _cached_divergence_and_grad(zb[:k], t.rows(slice(r0, r0 + k)), cfg)
            dist_sum += tau * tau * d.sum()
            extra.mul_(coef_d)
        elif k:
            d, extra = _divergence_and_grad(zb[:k], t[r0 : r0 + k], cfg)
            dist_sum += tau * tau * d.sum()
            extra.mul_(coef_d)
        if not need_grad:
            continue
        if k and share:  # rows [:k]: Q (w + c) - c P; rows [k:]: Q w
            zb[:k].mul_(-coef_d).add_(log_q[:k].exp_().mul_(w[:k] + coef_d))
            torch.exp(log_q[k:], out=zb[k:]).mul_(w[k:])
        else:
            torch.exp(log_q, out=zb).mul_(w)
        del log_q
        zb.scatter_add_(1, y, -w)  # - w onehot
        if extra is not None:
            zb[:k] += extra
        if dcap is not None:
            zb.mul_(dcap)
    return nll, (nll * mle_w).sum(), dist_sum * dist_w


def fused_pass(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t_h: torch.Tensor | TeacherTopK | None,
    t_weight: torch.Tensor | None,
    t_bias: torch.Tensor | None,
    targets: torch.Tensor,
    mle_w: torch.Tensor,
    dist_w: torch.Tensor,
    cfg: FusedConstants,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Chunk by chunk: loss sums, per-row nll and the gradients of mle + lambda * distill.

    Returns ([mle, distill] in the compute dtype, nll [R], (grad_h, grad_weight, grad_bias)).
    The weight gradient is accumulated in place in one [V, H] buffer of the weight's dtype.
    Live per chunk: the student logits (turned into their gradient in place), the teacher's
    logits for distilled rows, and row-block temporaries. t_h: the distilled rows' teacher hidden
    states, or their cached TeacherTopK.
    """
    dtype = compute_dtype(h)
    need_h, need_w, need_b = needs
    n_rows, n_d = h.shape[0], 0 if t_h is None else _n_rows(t_h)
    grad_h = torch.zeros(h.shape, dtype=dtype, device=h.device) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=h.device) if need_b else None
    sums = torch.zeros(2, dtype=dtype, device=h.device)
    nll = torch.empty(n_rows, dtype=dtype, device=h.device)
    block = _ceil_div(cfg.chunk, _BLOCKS_PER_CHUNK)
    split = _ceil_div(cfg.chunk, _TEACHER_SPLIT)
    for r0, r1 in _spans(n_rows, cfg.chunk):
        h_c = h[r0:r1].to(weight.dtype)
        z = head_logits(h_c, weight, bias, cfg.softcap)
        for s0, s1 in _spans(r1 - r0, split):
            a, b = r0 + s0, r0 + s1
            t = None
            if a < n_d and isinstance(t_h, TeacherTopK):
                t = t_h.rows(slice(a, min(b, n_d)))
            elif a < n_d:
                t = head_logits(t_h[a : min(b, n_d)], t_weight, t_bias, cfg.teacher_softcap)
            nll[a:b], mle_sum, dist_sum = _chunk_terms(
                z[s0:s1], targets[a:b], mle_w[a:b], t, dist_w, cfg, any(needs), block
            )
            del t
            sums[0] += mle_sum
            sums[1] += dist_sum
        if any(needs):
            g = z.to(weight.dtype)  # z now holds the gradient w.r.t. the pre-softcap logits
            z = None
            if need_h:
                grad_h[r0:r1] = (g @ weight).to(dtype)
            if need_w:
                grad_w.addmm_(g.t(), h_c)
            if need_b:
                grad_b += g.sum(0, dtype=dtype)
        # g may be z itself: drop both before the next chunk's logits are allocated.
        z = g = None
    return sums, nll, (grad_h, grad_w, grad_b)


class FusedHeadLoss(torch.autograd.Function):
    """[mle, distill] of rows of hidden states, gradients computed in forward (Liger-style).

    Backward only scales the stored gradients of mle + lambda * distill; it refuses an upstream
    gradient that is not of that form (e.g. mle alone backpropagated while distill is non-zero).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, t_h, t_weight, t_bias, targets, mle_w, dist_w, cfg):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        sums, nll, grads = fused_pass(
            h, weight, bias, t_h, t_weight, t_bias, targets, mle_w, dist_w, cfg, needs
        )
        ctx.save_for_backward(*grads)
        ctx.h_dtype = h.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.check = cfg.distill_weight > 0 and t_h is not None and _n_rows(t_h) > 0
        ctx.distill_weight = cfg.distill_weight
        ctx.mark_non_differentiable(nll)
        return sums, nll

    @staticmethod
    def backward(ctx, grad_sums, _grad_nll):
        g_mle, g_dist = grad_sums[0], grad_sums[1]
        if ctx.check and not torch.isclose(g_dist, g_mle * ctx.distill_weight, rtol=1e-5):
            raise RuntimeError(
                "token_loss_chunked: only total = mle + distill_weight * distill (or a multiple) "
                "can be backpropagated through the chunked path"
            )
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * g_mle).to(ctx.h_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(g_mle)  # in place: no second [V, H] buffer
        if grad_b is not None:
            grad_b = (grad_b * g_mle).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def score_pass(
    h: torch.Tensor,
    t_h: torch.Tensor | None,
    targets: torch.Tensor,
    head: OutputHead,
    teacher_head: OutputHead,
    select: str,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 (no grad): student nll [N] and selection scores [N], chunk by chunk."""
    dtype = compute_dtype(h)
    nll = torch.empty(h.shape[0], dtype=dtype, device=h.device)
    scores = torch.empty_like(nll)
    block, split = _ceil_div(chunk, _BLOCKS_PER_CHUNK), _ceil_div(chunk, _TEACHER_SPLIT)
    if select == "excess":
        # The student's logits at the teacher's granularity: the same matmul shapes make equal
        # weights give bitwise-equal logits, so the excess is exactly 0 while the student is
        # still the initial model (ties, broken by position) instead of rounding noise.
        chunk = split
    with torch.no_grad():
        for c0, c1 in _spans(h.shape[0], chunk):
            z = head_logits(h[c0:c1], head.weight, head.bias, head.softcap)
            for s0, s1 in _spans(c1 - c0, split):
                t = None
                if select == "excess":
                    t = head_logits(
                        t_h[c0 + s0 : c0 + s1],
                        teacher_head.weight,
                        teacher_head.bias,
                        teacher_head.softcap,
                    )
                for r0, r1 in _spans(s1 - s0, block):
                    a, b = c0 + s0 + r0, c0 + s0 + r1
                    y = targets[a:b].unsqueeze(1)
                    log_q = torch.log_softmax(z[s0 + r0 : s0 + r1], dim=-1)
                    nll[a:b] = -log_q.gather(1, y).squeeze(1)
                    if select == "entropy":
                        scores[a:b] = -_rowdot(log_q.exp(), log_q)
                    elif select == "excess":
                        log_p = torch.log_softmax(t[r0:r1], dim=-1)
                        scores[a:b] = nll[a:b] + log_p.gather(1, y).squeeze(1)
                    else:
                        scores[a:b] = nll[a:b]
                t = None  # freed before the next teacher block is made
            z = None  # freed before the next chunk's logits are made
    return nll, scores


def nll_pass(h: torch.Tensor, targets: torch.Tensor, head: OutputHead, chunk: int) -> torch.Tensor:
    """Student nll [N] only (no grad), for rows pass 2 does not visit."""
    nll, _ = score_pass(h, None, targets, head, head, "nll", chunk)
    return nll

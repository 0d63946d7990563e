"""The losses of every Pare stage (importance's ``layer_loss``, search, distillation, evaluation),
computed on vocab-parallel logits without gathering the vocabulary.

Logits are what megatron's output layer gives with ``parallel_output=True``: shape [s, b, V_local]
or [N, V_local] (any leading dims are tokens), where rank r of ``tp_group`` holds the columns
[r * V_local, (r + 1) * V_local) of the padded vocabulary. ``tp_group=None`` means the logits hold
the whole padded vocabulary. Columns >= ``vocab_size`` (the padding, e.g. 100278 -> 100352) are left
out: zero probability and zero gradient whatever their values. As in megatron's
``vocab_parallel_cross_entropy``, each token's max and sum of exponentials are all-reduced over the
TP group; only [tokens]-sized vectors (and, for ``top_k``, [tokens, k] candidates) travel.

``teacher_top_k(teacher_logits, vocab_size, k, temperature)`` and ``kl_divergence_stored(student_logits,
ids, logprobs, log_rest, vocab_size, kind, beta, temperature)``: offline distillation. The first
gives, per token, the teacher's k most probable token ids, their log-probabilities under
softmax(teacher_logits / T) and the log of the rest of the mass (what ``pare teacher-logits``
stores); the second is ``kl_divergence(..., top_k=k)`` computed from those stored values instead of
the teacher's logits, to the last bit at TP=1 (the same arithmetic).

``next_token_nll`` (the LM loss of every stage: importance's layer_loss, search, distillation's CE
term, evaluation, training) and ``state_distance`` (distillation's intermediate-state terms) are
built on them, below the two primitives.

Both primitives return a per-token loss, fp32, shaped like the logits without their last dim; the
caller masks and reduces it (``(loss * mask).sum() / mask.sum()``). Over the real vocabulary:

``cross_entropy(logits, labels, vocab_size)``
    ``-log softmax(logits)[label]``; labels must be in [0, vocab_size) (give masked-out positions
    any valid id, e.g. the pad token's, and mask their losses).

``kl_divergence(student_logits, teacher_logits, vocab_size, kind, beta, temperature, top_k)``
    with p = softmax(teacher_logits / T) and q = softmax(student_logits / T):

    - ``kind="forward"``: KL(p || q) = sum_i p_i (log p_i - log q_i)
    - ``kind="reverse"``: KL(q || p) = sum_i q_i (log q_i - log p_i)
    - ``kind="jsd"``: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, with
      0 < beta < 1 (the generalized JSD of GKD, Agarwal et al. 2024, as TRL writes it: beta weighs
      the teacher); beta = 0.5 is the symmetric Jensen-Shannon divergence. JSD / beta -> forward KL
      as beta -> 0 and JSD / (1 - beta) -> reverse KL as beta -> 1: use those kinds there.

    ``temperature`` T divides both logits; no T^2 factor is applied: multiply the loss by T**2
    yourself (Hinton et al.) to keep gradient magnitudes comparable across temperatures.
    ``top_k=k``: p and q are replaced by (k + 1)-point distributions: the probabilities of the
    teacher's k most probable tokens (over the whole vocabulary, across TP ranks), plus one bucket
    with each distribution's remaining mass; the divergence is taken on those k + 1 probabilities.
    k >= vocab_size gives the full divergence. Only the student gets a gradient.

Gradients are exact at any TP: the all-reduces live inside the forward of a custom
``torch.autograd.Function`` (never differentiated); its backward returns each rank's slice of
d loss / d logits, equal to TP=1's slice (no factor of the TP size).

Memory: all math is fp32, ``chunk`` tokens at a time (default: as many as make a [chunk, V_local]
fp32 tensor of 2**24 elements, 64 MiB; a few such tensors are the whole fp32 workspace). The forward
computes each token's gradient d loss_i / d logits_i and stores it in the logits' dtype: one tensor
the size of the logits, i.e. the gradient that backward has to return anyway; backward scales it by
the incoming per-token gradient in place and returns it. Chosen over recomputing in backward: the
same peak (recomputing would keep the student and teacher logits alive until backward instead), half
the work, and the teacher logits can be freed right after the forward. A second backward through
the same graph (``retain_graph=True``) is refused by autograd's in-place check. Under
``torch.no_grad()`` or when the logits do not require grad, nothing is stored. In bf16 the stored
gradient is rounded twice (stored, then scaled): within 2**-7 relative of the exact value.
benchmarks/bench_kl_memory.py compares peak memory and time with a plain fp32 PyTorch KL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.utils import VocabUtility

KINDS = ("forward", "reverse", "jsd")
STATE_DISTANCES = ("cosine", "mse")
CHUNK_ELEMENTS = 1 << 24  # default chunk: tokens * V_local ~ 2**24 fp32 elements (64 MiB)
_MAX, _SUM = dist.ReduceOp.MAX, dist.ReduceOp.SUM


# ------------------------------------------------------------------------------------------------
# public API


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, tp_group=None,
                  chunk: int | None = None) -> torch.Tensor:
    """Per-token ``-log softmax(logits[..., :vocab_size])[labels]`` (fp32, shaped like ``labels``)
    on vocab-parallel ``logits`` [..., V_local]; see the module docstring."""
    _check_logits(logits, "logits")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits shape without the vocab "
                         f"dim {tuple(logits.shape[:-1])}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    lay = _layout(logits, vocab_size, tp_group, chunk)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab_size):
        raise ValueError(f"labels must be in [0, {vocab_size}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    if torch.is_grad_enabled() and logits.requires_grad:
        return _StoredGradient.apply(logits, _ce_chunks, lay["chunk"], labels, lay)
    return _ce_chunks(logits, labels, lay, need_grad=False)[0]


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int,
                  kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                  top_k: int | None = None, tp_group=None,
                  chunk: int | None = None) -> torch.Tensor:
    """Per-token divergence between softmax(teacher_logits / T) and softmax(student_logits / T)
    over the real vocabulary (fp32, shaped like the logits without their last dim); ``kind``
    "forward" KL(p||q), "reverse" KL(q||p) or "jsd"; see the module docstring."""
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (beta -> 0 / 1: use kind='forward' "
                         "/ 'reverse')")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    lay = _layout(student_logits, vocab_size, tp_group, chunk)
    top_k = None if top_k is None else min(top_k, vocab_size)
    opts = (kind, float(beta), float(temperature), top_k)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _StoredGradient.apply(student_logits, _kl_chunks, lay["chunk"], teacher_logits,
                                     lay, opts)
    return _kl_chunks(student_logits, teacher_logits, lay, opts, need_grad=False)[0]


def teacher_top_k(logits: torch.Tensor, vocab_size: int, k: int, temperature: float = 1.0,
                  tp_group=None, chunk: int | None = None):
    """``(ids, logprobs, log_rest)`` of each token's k most probable tokens under
    softmax(logits / T) over the real vocabulary: global token ids [..., k] (int64, most probable
    first), their log-probabilities [..., k] and the log of the remaining mass [...] (fp32; -inf
    when k covers the vocabulary). Vocab-parallel like the other losses: every TP rank returns the
    same values. No gradient (the teacher's)."""
    _check_logits(logits, "logits")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    lay = _layout(logits, vocab_size, tp_group, chunk)
    k = min(k, vocab_size)
    with torch.no_grad():
        x2 = logits.reshape(-1, lay["v_local"])
        n, nv = x2.shape[0], lay["real"]
        ids = torch.empty(n, k, dtype=torch.long, device=logits.device)
        logprobs = torch.empty(n, k, dtype=torch.float32, device=logits.device)
        rest = torch.empty(n, dtype=torch.float32, device=logits.device)
        for r0 in range(0, n, lay["chunk"]):
            x = x2[r0:r0 + lay["chunk"], :nv]
            top, gid, sel = _top_k(x, k, lay)
            M, S, shift = _normalizer(x.float(), sel, lay, temperature)
            ids[r0:r0 + len(x)] = gid
            logprobs[r0:r0 + len(x)] = (top - M[0, :, None]) / temperature - S[0, :, None]
            rest[r0:r0 + len(x)] = S[1] - shift - S[0]
    lead = logits.shape[:-1]
    return ids.view(*lead, k), logprobs.view(*lead, k), rest.view(lead)


def kl_divergence_stored(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                         log_rest: torch.Tensor, vocab_size: int, kind: str = "forward",
                         beta: float = 0.5, temperature: float = 1.0, tp_group=None,
                         chunk: int | None = None) -> torch.Tensor:
    """Per-token ``kl_divergence(student_logits, teacher_logits, top_k=k)`` from the teacher's
    stored top k (``teacher_top_k``'s ``ids``, ``logprobs``, ``log_rest``, computed at the same
    ``temperature``): the divergence over the k tokens plus one bucket with the rest of each
    distribution's mass. Only the student gets a gradient."""
    _check_logits(student_logits, "student_logits")
    lead = tuple(student_logits.shape[:-1])
    if ids.shape[:-1] != lead or logprobs.shape != ids.shape or tuple(log_rest.shape) != lead:
        raise ValueError(f"stored teacher ids {tuple(ids.shape)}, logprobs "
                         f"{tuple(logprobs.shape)} and log_rest {tuple(log_rest.shape)} do not fit "
                         f"student logits {tuple(student_logits.shape)} ([..., k], [..., k], [...])")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    lay = _layout(student_logits, vocab_size, tp_group, chunk)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"stored teacher ids must be in [0, {vocab_size})")
    stored = (ids.reshape(-1, ids.shape[-1]), logprobs.reshape(-1, ids.shape[-1]),
              log_rest.reshape(-1))
    opts = (kind, float(beta), float(temperature), ids.shape[-1])
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _StoredGradient.apply(student_logits, _kl_chunks, lay["chunk"], stored, lay, opts)
    return _kl_chunks(student_logits, stored, lay, opts, need_grad=False)[0]


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                   vocab_size: int, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of next-token cross-entropy over the positions whose token and next token
    are both real: the one LM loss definition of every stage. ``logits`` [b, s, V_local]
    (vocab-parallel over ``tp_group``, or the whole padded vocabulary when it is None), ``tokens``
    and ``mask`` [b, s]. The labels are the tokens shifted by one inside the row (the last position
    has none and is masked out), so the loss runs on the logits as they are: no sliced copy of them,
    and the stored gradient has the logits' own shape."""
    per_token, keep = next_token_losses(logits, tokens, mask, vocab_size, tp_group)
    return (per_token * keep).sum(), keep.sum()


def next_token_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                      vocab_size: int, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, keep)`` [b, s] of :func:`next_token_nll` token by token: the loss at position ``i``
    predicts token ``i + 1``; ``keep`` says which positions count."""
    labels = torch.roll(tokens, -1, dims=1)
    keep = mask & torch.roll(mask, -1, dims=1)
    keep[:, -1] = False
    return cross_entropy(logits, labels, vocab_size, tp_group=tp_group), keep


def grouped_sums(per_token: torch.Tensor, keep: torch.Tensor, groups: torch.Tensor | None,
                 num_groups: int) -> torch.Tensor:
    """[1 + num_groups, 2] fp64 (summed loss, count) of per-token losses [b, s] where ``keep``:
    over all, then over each group's positions (``groups`` [b, s], -1: none)."""
    sums = torch.zeros(1 + num_groups, 2, dtype=torch.float64, device=per_token.device)
    sums[0] = torch.stack([(per_token * keep).sum().double(), keep.sum().double()])
    if num_groups:
        sel = keep & (groups >= 0)
        values = per_token[sel].detach().double()
        sums[1:].index_add_(0, groups[sel], torch.stack([values, torch.ones_like(values)], -1))
    return sums


def state_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token distance [...] between hidden states [..., h] (fp32): ``1 - cos`` or the mean
    squared error over the hidden size."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-6)
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    raise ValueError(f"unknown state distance {kind!r}; expected one of {STATE_DISTANCES}")


# ------------------------------------------------------------------------------------------------
# autograd: forward stores each token's gradient, backward scales it


class _StoredGradient(torch.autograd.Function):
    """``loss, grad = chunks(logits, *rest, need_grad=True)`` in forward; the per-token gradient
    ``grad`` (only ``logits`` gets one) is stored and, in backward, scaled by the incoming one."""

    @staticmethod
    def forward(ctx, logits, chunks, chunk, *rest):
        loss, grad = chunks(logits, *rest, need_grad=True)
        ctx.save_for_backward(grad)
        ctx.chunk, ctx.n_rest = chunk, len(rest)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (_scale_rows(grad, grad_loss, ctx.chunk), None, None) + (None,) * ctx.n_rest


def _scale_rows(grad, grad_loss, chunk):
    """grad [..., V_local] *= grad_loss [...] per token, in place (fp32 math), and return it."""
    g2, w = grad.view(-1, grad.shape[-1]), grad_loss.reshape(-1).float()
    if g2.dtype == torch.float32:
        g2.mul_(w[:, None])
    else:
        for r0 in range(0, g2.shape[0], chunk):
            rows = g2[r0:r0 + chunk]
            rows.copy_(rows.float().mul_(w[r0:r0 + chunk, None]))
    return grad


# ------------------------------------------------------------------------------------------------
# chunked computations


def _check_logits(t, name):
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor [..., V_local], got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")


def _layout(logits, vocab_size, tp_group, chunk):
    """This rank's vocab slice: its first global column, how many of its columns are real."""
    rank, world = (0, 1) if tp_group is None else (dist.get_rank(tp_group),
                                                   dist.get_world_size(tp_group))
    v_local = logits.shape[-1]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size > v_local * world:
        raise ValueError(f"vocab_size {vocab_size} > {world} TP rank(s) x {v_local} logit columns"
                         + ("; pass tp_group= for vocab-parallel logits" if world == 1 else ""))
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int (tokens) or None, got {chunk!r}")
    start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(v_local, rank, world)
    return dict(group=tp_group, rank=rank, world=world, v_local=v_local, start=start,
                real=max(0, min(v_local, vocab_size - start)),
                chunk=chunk or max(1, CHUNK_ELEMENTS // v_local))


def _all_reduce(t, op, lay):
    if lay["world"] > 1:
        dist.all_reduce(t, op=op, group=lay["group"])
    return t


def _row_max(x):
    """Per-row max as fp32; -inf for rows of a rank that holds no real column."""
    if x.shape[1] == 0:
        return torch.full((x.shape[0],), float("-inf"), device=x.device)
    return x.amax(dim=1).float()


def _new_grad(logits, lay, need_grad):
    """The stored gradient [N, V_local] in the logits' dtype, padding columns zeroed."""
    if not need_grad:
        return None
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad[..., lay["real"]:] = 0
    return grad


def _outputs(logits, lay, need_grad):
    """(logits as [N, V_local], the per-token loss [N] to fill, the stored gradient (None without
    one) and its [N, V_local] view)."""
    x2 = logits.reshape(-1, lay["v_local"])
    loss = torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)
    grad = _new_grad(logits, lay, need_grad)
    return x2, loss, grad, None if grad is None else grad.view(-1, lay["v_local"])


def _ce_chunks(logits, labels, lay, need_grad):
    x2, loss, grad, g2 = _outputs(logits, lay, need_grad)
    y, nv, chunk = labels.reshape(-1), lay["real"], lay["chunk"]
    for r0 in range(0, x2.shape[0], chunk):
        x = x2[r0:r0 + chunk, :nv]
        lab = y[r0:r0 + chunk] - lay["start"]
        mine = (lab >= 0) & (lab < nv)  # the label's column lives on this rank
        lab = torch.where(mine, lab, 0)[:, None]
        m = _all_reduce(_row_max(x), _MAX, lay)
        z = x - m[:, None]  # fp32 (new tensor, also for bf16 x)
        target = z.gather(1, lab)[:, 0] if nv else torch.zeros_like(m)
        target = torch.where(mine, target, 0.0)
        z.exp_()
        st = _all_reduce(torch.stack([z.sum(1), target]), _SUM, lay)
        loss[r0:r0 + chunk] = st[0].log() - st[1]
        if g2 is not None:
            z.div_(st[0][:, None])  # softmax; minus one at the label
            if nv:
                z.scatter_add_(1, lab, -mine.float()[:, None])
            g2[r0:r0 + chunk, :nv] = z
    return loss.view(logits.shape[:-1]), grad


def _xmul(x, y):
    """x * y with 0 where x == 0 (y may be infinite there): the x log x = 0 convention."""
    return torch.where(x > 0, x * y, 0.0)


def _jsd_logs_(d, beta):
    """For d = log p - log q and m = beta p + (1 - beta) q: (log m - log p, log m - log q), the
    first in d's memory; exactly 0 where p == q, no overflow: t = log1p((1-beta) expm1(-d)) =
    log m - log p for d > 0, t = log1p(beta expm1(d)) = log m - log q for d <= 0."""
    t = d.abs().neg_().expm1_().mul_(torch.where(d > 0, 1.0 - beta, beta)).log1p_()
    b = d.clamp(min=0).add_(t)  # log m - log q
    del t
    return d.neg_().add_(b), b  # log m - log p = b - d


def _top_k(x, k, lay):
    """Each row's k largest values of ``x`` [c, real] over the whole vocabulary (fp32, largest
    first), their global column ids and [c, real] bool: which of this rank's columns they are.
    Every rank sends its min(k, V_local) best (padded with -inf), all ranks pick the same k from
    the gathered candidates."""
    c, nv = x.shape
    kg = min(k, lay["v_local"])  # the same on every rank; world * kg >= vocab_size >= k
    kl = min(kg, nv)
    vals = torch.full((c, kg), float("-inf"), device=x.device)
    idx = torch.zeros((c, kg), dtype=torch.long, device=x.device)
    if kl:
        v, i = x.topk(kl, dim=1)
        vals[:, :kl], idx[:, :kl] = v.float(), i + lay["start"]
    if lay["world"] > 1:
        parts = [torch.empty_like(vals) for _ in range(lay["world"])]
        dist.all_gather(parts, vals, group=lay["group"])
        vals = torch.cat(parts, dim=1)
        parts = [torch.empty_like(idx) for _ in range(lay["world"])]
        dist.all_gather(parts, idx, group=lay["group"])
        idx = torch.cat(parts, dim=1)
    top, pos = vals.topk(k, dim=1)
    gid = idx.gather(1, pos)
    return top, gid, _columns(gid, nv, lay)[0]


def _columns(gid, nv, lay):
    """For global ids ``gid`` [c, k]: [c, real] bool, which of this rank's columns they are, and
    their local column [c, k] (``real`` where another rank holds them)."""
    local = gid - lay["start"]
    local = torch.where((local >= 0) & (local < nv), local, nv)  # nv: a dummy column
    sel = torch.zeros((gid.shape[0], nv + 1), dtype=torch.bool, device=gid.device)
    return sel.scatter_(1, local, True)[:, :nv], local


def _normalizer(x, sel, lay, T):
    """For x [c, real] (fp32): the max over the vocabulary and over the bucket (the columns not in
    ``sel``), M [2, c]; log of the sums of exp((x - max) / T), S [2, c] (the whole vocabulary, the
    bucket); the shift (M[0] - M[1]) / T from one max to the other. The bucket's own max keeps its
    log-mass finite (no underflow); an empty bucket has S[1] = -inf."""
    ninf = float("-inf")
    M = _all_reduce(torch.stack([_row_max(x), _row_max(x.masked_fill(sel, ninf))]), _MAX, lay)
    M = torch.where(M > ninf, M, 0.0)  # empty bucket (k = vocab): its sum below is 0
    z = (x - M[0, :, None]) / T
    shift = (M[0] - M[1]) / T
    sums = [torch.exp(z).sum(1), torch.exp(z + shift[:, None]).masked_fill_(sel, 0).sum(1)]
    return M, _all_reduce(torch.stack(sums), _SUM, lay).log_(), shift


def _teacher_columns(teacher, lay, r0, c, nv, T, k, xs):
    """The teacher side of one chunk: B [c, real] (log p on this rank's columns; on the top-k
    columns only when ``sel`` is given), sel, log p of the bucket; and the student's max, log-sums
    and shifts reduced with it. ``teacher`` is a logits tensor [N, V_local] or the stored top k
    ``(ids, logprobs, log_rest)``."""
    ninf = float("-inf")
    if isinstance(teacher, tuple):  # stored: log p of the top k and of the bucket are given
        ids, lps, rest = (t[r0:r0 + c] for t in teacher)
        sel, local = _columns(ids, nv, lay)
        B = torch.zeros((c, nv + 1), dtype=torch.float32, device=xs.device)
        B = B.scatter_(1, local, lps.float())[:, :nv]
        M, S, shift = _normalizer(xs.float(), sel, lay, T)
        A = (xs - M[0, :, None]) / T - S[0, :, None]  # log q
        return A, B, sel, S[1] - shift - S[0], rest.float()
    xt = teacher[r0:r0 + c, :nv]
    sel = _top_k(xt, k, lay)[2] if k is not None else None
    maxes = [_row_max(xs), _row_max(xt)]
    if sel is not None:  # the bucket's own max keeps its log-mass finite (no underflow)
        maxes += [_row_max(xs.masked_fill(sel, ninf)), _row_max(xt.masked_fill(sel, ninf))]
    M = _all_reduce(torch.stack(maxes), _MAX, lay)
    M = torch.where(M > ninf, M, 0.0)  # empty bucket (k = vocab): its sum below is 0
    A = xs - M[0, :, None]  # student logits minus their max (a new fp32 tensor)
    B = xt - M[1, :, None]
    if T != 1.0:
        A.div_(T), B.div_(T)
    sums = [torch.exp(A).sum(1), torch.exp(B).sum(1)]
    if sel is not None:
        shift = (M[:2] - M[2:]) / T  # from each max to its bucket's max
        sums += [torch.exp(A + shift[0, :, None]).masked_fill_(sel, 0).sum(1),
                 torch.exp(B + shift[1, :, None]).masked_fill_(sel, 0).sum(1)]
    S = _all_reduce(torch.stack(sums), _SUM, lay).log_()
    A.sub_(S[0, :, None])  # log q
    B.sub_(S[1, :, None])  # log p
    if sel is None:
        return A, B, None, None, None
    # log q and log p of the bucket; -inf when it is empty
    return A, B, sel, S[2] - shift[0] - S[0], S[3] - shift[1] - S[1]


def _kl_chunks(student, teacher, lay, opts, need_grad):
    """``teacher``: logits like ``student``, or the stored top k ``(ids, logprobs, log_rest)``."""
    kind, beta, T, k = opts
    s2, loss, grad, g2 = _outputs(student, lay, need_grad)
    if not isinstance(teacher, tuple):
        teacher = teacher.reshape(-1, lay["v_local"])
    nv, chunk = lay["real"], lay["chunk"]
    for r0 in range(0, s2.shape[0], chunk):
        xs = s2[r0:r0 + chunk, :nv]
        A, B, sel, lq_r, lp_r = _teacher_columns(teacher, lay, r0, xs.shape[0], nv, T, k, xs)
        if sel is not None:
            q_r, p_r = lq_r.exp(), lp_r.exp()
        # per column: `terms` sum to the loss; h_i = q_i dL/dq_i, so that
        # dL/d(logit_i / T) = h_i - q_i E with E = sum_i h_i (the bucket counts as one column)
        if kind == "forward":  # h = -p, E = -1
            p = B.exp()
            terms = B.sub_(A).mul_(p)  # p (log p - log q)
            if sel is not None:
                l_r = _xmul(p_r, lp_r - lq_r)
        elif kind == "reverse":
            q = A.exp()
            terms = h = B.neg_().add_(A).mul_(q)  # q (log q - log p)
            del A
            if sel is not None:
                l_r = h_r = _xmul(q_r, lq_r - lp_r)
                g_r = lq_r - lp_r  # h_r / q_r
        else:
            p, q = B.exp(), A.exp()
            B.sub_(A)  # log p - log q
            del A
            a, b = _jsd_logs_(B, beta)  # a in B's memory
            h = b.mul_(q).mul_(beta - 1.0)  # -(1 - beta) q (log m - log q)
            terms = a.mul_(p).mul_(-beta).add_(h)  # + -beta p (log m - log p)
            del p
            if sel is not None:
                a_r, b_r = _jsd_logs_(lp_r - lq_r, beta)
                h_r = (beta - 1.0) * _xmul(q_r, b_r)
                l_r = -beta * _xmul(p_r, a_r) + h_r
                g_r = (beta - 1.0) * b_r
        del B
        if sel is not None:
            terms = torch.where(sel, terms, 0.0)
            h = torch.where(sel, h, 0.0) if kind != "forward" else None
        LE = [terms.sum(1)] + ([h.sum(1)] if kind != "forward" else [])
        LE = _all_reduce(torch.stack(LE), _SUM, lay)
        del terms
        if sel is not None:
            LE += torch.stack([l_r] + ([h_r] if kind != "forward" else []))
        loss[r0:r0 + chunk] = LE[0]
        if g2 is None:
            continue
        if kind == "forward":  # q_i - p_i
            if sel is None:
                gr = A.exp_().sub_(p)
            else:  # bucket columns: q_i (1 - p_r / q_r) = q_i - exp(log q_i + log p_r - log q_r)
                q = A.exp()
                rest = torch.exp(A.add_((lp_r - lq_r)[:, None])).neg_().add_(q)
                gr = torch.where(sel, q.sub_(p), rest)
        else:
            E = LE[1, :, None]
            gr = h.addcmul_(q, E, value=-1.0)
            if sel is not None:  # bucket columns: q_i (h_r / q_r - E)
                gr = torch.where(sel, gr, q * (g_r[:, None] - E))
        g2[r0:r0 + chunk, :nv] = gr.div_(T) if T != 1.0 else gr
    return loss.view(student.shape[:-1]), grad

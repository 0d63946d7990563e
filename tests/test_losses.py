"""pare_nemo.losses against plain full-vocabulary PyTorch in fp64, and TP=2 against TP=1.

Tolerances: fp32 math on logits of magnitude ~10 gives log-probabilities to a few fp32 ulps of 10
(~1e-6), hence 1e-6 (absolute + relative) for values and gradients of fp32 inputs. bf16 gradients
are rounded twice (stored, then scaled by the incoming gradient): within 2 bf16 unit roundoffs
(2**-7) of the exact gradient of the same bf16 logits."""

import pytest
import torch

from pare_nemo.losses import cross_entropy, kl_divergence
from tests.dist_workers import spawn
from tests.loss_workers import CASES, make_inputs, run_cases, tp_worker

V, PADDED = 1000, 1024  # vocabulary 1000 padded to 1024: 24 padding columns


def reference(student, teacher, kind, beta=0.5, temperature=1.0, top_k=None):
    """Full-vocabulary divergence from the definitions, per token; fp64 autograd for gradients."""
    lq = torch.log_softmax(student[..., :V].double() / temperature, -1)
    lp = torch.log_softmax(teacher[..., :V].double() / temperature, -1)
    if top_k is not None:  # the teacher's top-k tokens + one bucket with the rest of the mass
        idx = teacher[..., :V].topk(top_k, -1).indices

        def bucketed(lx):
            top = lx.gather(-1, idx)
            rest = (1 - top.exp().sum(-1, keepdim=True)).clamp(min=0)
            return torch.cat([top, rest.log()], -1)

        lq, lp = bucketed(lq), bucketed(lp)
    p, q = lp.exp(), lq.exp()

    def kl(a, la, lb):  # KL(a || b), with 0 log 0 = 0
        return torch.where(a > 0, a * (la - lb), 0.0).sum(-1)

    if kind == "forward":
        return kl(p, lp, lq)
    if kind == "reverse":
        return kl(q, lq, lp)
    lm = (beta * p + (1 - beta) * q).log()
    return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)


def loss_and_grad(fn, student, *args, weights=None, **kw):
    student = student.detach().clone().requires_grad_()
    loss = fn(student, *args, **kw)
    w = torch.ones_like(loss) if weights is None else weights.to(loss.dtype)
    (w * loss).sum().backward()
    return loss.detach(), student.grad


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(V, PADDED)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def test_cross_entropy_matches_pytorch(inputs):
    s, labels, w = inputs["student"], inputs["labels"], inputs["weights"]
    loss, grad = loss_and_grad(cross_entropy, s, labels, V, weights=w)
    ref, ref_grad = loss_and_grad(
        lambda x: torch.nn.functional.cross_entropy(
            x[..., :V].flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape),
        s.double(), weights=w)
    assert loss.shape == labels.shape and loss.dtype == torch.float32
    close(loss, ref)
    close(grad, ref_grad)
    assert torch.all(grad[..., V:] == 0)


@pytest.mark.parametrize("kind,beta,temperature,top_k", [
    ("forward", 0.5, 1.0, None), ("reverse", 0.5, 1.0, None),
    ("jsd", 0.1, 1.0, None), ("jsd", 0.5, 1.0, None), ("jsd", 0.9, 1.0, None),
    ("forward", 0.5, 2.0, None), ("reverse", 0.5, 0.5, None), ("jsd", 0.5, 3.0, None),
    ("forward", 0.5, 1.0, 10), ("reverse", 0.5, 1.0, 10), ("jsd", 0.1, 1.0, 10),
    ("jsd", 0.9, 2.0, 10), ("forward", 0.5, 0.5, 1), ("reverse", 0.5, 1.0, 300),
])
def test_kl_matches_definition(inputs, kind, beta, temperature, top_k):
    s, t, w = inputs["student"], inputs["teacher"], inputs["weights"]
    kw = dict(kind=kind, beta=beta, temperature=temperature, top_k=top_k)
    loss, grad = loss_and_grad(kl_divergence, s, t, V, weights=w, **kw)
    ref, ref_grad = loss_and_grad(reference, s.double(), t.double(), weights=w, **kw)
    assert loss.shape == s.shape[:-1] and loss.dtype == torch.float32
    assert ref.min() > 1e-4  # a real divergence
    close(loss, ref)
    close(grad, ref_grad)
    assert torch.all(grad[..., V:] == 0)  # padding: logits 40 / 50 above the rest, no gradient


def test_padding_columns_have_no_effect(inputs):
    s, t = inputs["student"].clone(), inputs["teacher"].clone()
    base = [loss_and_grad(kl_divergence, s, t, V, kind="jsd"),
            loss_and_grad(cross_entropy, s, inputs["labels"], V)]
    s[..., V:], t[..., V:] = 1e4, -1e4  # huge padding logits change nothing
    for (l0, g0), (l1, g1) in zip(base, [loss_and_grad(kl_divergence, s, t, V, kind="jsd"),
                                         loss_and_grad(cross_entropy, s, inputs["labels"], V)]):
        assert torch.equal(l0, l1) and torch.equal(g0, g1)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_top_k_of_whole_vocabulary_is_full_kl(inputs, kind):
    s, t = inputs["student"], inputs["teacher"]
    full = loss_and_grad(kl_divergence, s, t, V, kind=kind, temperature=2.0)
    for k in (V, V + 1000):  # k beyond the vocabulary: all of it
        top = loss_and_grad(kl_divergence, s, t, V, kind=kind, temperature=2.0, top_k=k)
        close(top[0], full[0], 1e-7)
        close(top[1], full[1], 1e-7)


@pytest.mark.parametrize("top_k", [None, 10])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_student_equal_to_teacher(inputs, kind, top_k):
    t = inputs["teacher"]
    loss, grad = loss_and_grad(kl_divergence, t, t, V, kind=kind, top_k=top_k, temperature=1.5)
    assert torch.all(loss == 0) and torch.all(grad == 0)  # the same numbers on both sides


@pytest.mark.parametrize("kind", ["ce", "forward", "reverse", "jsd"])
def test_chunk_size_does_not_change_results(inputs, kind):
    s, t = inputs["student"], inputs["teacher"]
    runs = []
    for chunk in (7, 10**6):
        if kind == "ce":
            runs.append(loss_and_grad(cross_entropy, s, inputs["labels"], V, chunk=chunk))
        else:
            runs.append(loss_and_grad(kl_divergence, s, t, V, kind=kind, top_k=20, chunk=chunk))
    close(runs[0][0], runs[1][0], 1e-7)
    close(runs[0][1], runs[1][1], 1e-7)


@pytest.mark.parametrize("kind", ["ce", "forward", "reverse", "jsd"])
def test_bf16_logits(inputs, kind):
    s, t, w = inputs["student"].bfloat16(), inputs["teacher"].bfloat16(), inputs["weights"]
    if kind == "ce":
        loss, grad = loss_and_grad(cross_entropy, s, inputs["labels"], V, weights=w)
        ref, ref_grad = loss_and_grad(cross_entropy, s.float(), inputs["labels"], V, weights=w)
    else:
        loss, grad = loss_and_grad(kl_divergence, s, t, V, kind=kind, weights=w)
        ref, ref_grad = loss_and_grad(reference, s.double(), t.double(), kind=kind, weights=w)
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    close(loss, ref, 1e-5)  # fp32 math on the same (bf16) numbers
    # 2 bf16 roundings, plus fp32 cancellation where q_i (log q_i - log p_i - KL) is ~0
    ref_grad = ref_grad.double()
    err = (grad.double() - ref_grad).abs()
    assert torch.all(err <= 2**-7 * ref_grad.abs() + 1e-7 * ref_grad.abs().max())
    assert torch.all(grad[..., V:] == 0)


def test_no_grad_gives_the_same_values(inputs):
    s, t = inputs["student"], inputs["teacher"]
    with_grad = loss_and_grad(kl_divergence, s, t, V, kind="reverse", top_k=5)[0]
    with torch.no_grad():
        no_grad = kl_divergence(s.requires_grad_(), t, V, kind="reverse", top_k=5)
    s.requires_grad_(False)
    assert not no_grad.requires_grad and torch.equal(no_grad, with_grad)
    assert torch.equal(cross_entropy(s, inputs["labels"], V), loss_and_grad(
        cross_entropy, s, inputs["labels"], V)[0])


def test_second_backward_is_refused(inputs):
    s = inputs["student"].clone().requires_grad_()
    loss = kl_divergence(s, inputs["teacher"], V).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_bad_input(inputs):
    s, t, labels = inputs["student"], inputs["teacher"], inputs["labels"]
    bad = [
        (lambda: kl_divergence(s, t, 2000), "pass tp_group"),
        (lambda: kl_divergence(s, t, V, kind="js"), "kind must be"),
        (lambda: kl_divergence(s, t, V, kind="jsd", beta=0.0), "0 < beta < 1"),
        (lambda: kl_divergence(s, t, V, temperature=0), "temperature"),
        (lambda: kl_divergence(s, t, V, top_k=0), "top_k"),
        (lambda: kl_divergence(s, t[:2], V), "differ in shape"),
        (lambda: kl_divergence(s, t, V, chunk=0), "chunk"),
        (lambda: cross_entropy(s, labels + V, V), r"labels must be in \[0, 1000\)"),
        (lambda: cross_entropy(s, labels.float(), V), "integer"),
        (lambda: cross_entropy(s, labels[:2], V), "labels shape"),
        (lambda: cross_entropy(s[0, 0], labels[0, 0], V), "floating tensor"),
    ]
    for fn, match in bad:
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.parametrize("kind,beta,temperature,top_k", [
    ("forward", 0.5, 1.0, 7), ("reverse", 0.5, 2.0, 7), ("jsd", 0.3, 0.5, 7),
    ("forward", 0.5, 2.0, V), ("jsd", 0.5, 1.0, V)])
def test_stored_top_k_is_online_top_k(inputs, kind, beta, temperature, top_k):
    """Offline KD from the teacher's stored top k (ids, log-probs, log of the rest) is online
    top-k KD: the same loss and gradient (here to the last bit: the same arithmetic), and the
    stored values are those of the definition."""
    from pare_nemo.losses import kl_divergence_stored, teacher_top_k

    student, teacher, w = inputs["student"], inputs["teacher"], inputs["weights"]
    ids, lps, rest = teacher_top_k(teacher, V, top_k, temperature)
    lp = torch.log_softmax(teacher[..., :V].double() / temperature, -1)
    assert torch.equal(ids, teacher[..., :V].topk(top_k, -1).indices)
    close(lps, lp.gather(-1, ids), tol=1e-5)
    rest_ref = (1 - lp.gather(-1, ids).exp().sum(-1)).clamp(min=0).log()
    if top_k < V:
        close(rest, rest_ref, tol=1e-4)
    else:
        assert torch.isneginf(rest).all()
    online = loss_and_grad(kl_divergence, student, teacher, V, kind=kind, beta=beta,
                           temperature=temperature, top_k=top_k, weights=w)
    stored = loss_and_grad(kl_divergence_stored, student, ids, lps, rest, V, kind=kind,
                           beta=beta, temperature=temperature, weights=w)
    assert torch.equal(stored[0], online[0]) and torch.equal(stored[1], online[1])
    # fp16 storage (pare teacher-logits' default): within fp16's rounding of the log-probs
    half = loss_and_grad(kl_divergence_stored, student, ids, lps.half(), rest, V, kind=kind,
                         beta=beta, temperature=temperature, weights=w)
    close(half[0], online[0], tol=2e-3)


def test_tensor_parallel_equals_tp1(tmp_path):
    inputs = {V: make_inputs(V, PADDED), 400: make_inputs(400, PADDED)}  # 400: rank 1 all padding
    torch.save(inputs, tmp_path / "inputs.pt")
    spawn(tp_worker, 2, str(tmp_path / "inputs.pt"), str(tmp_path), tmp=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    half = PADDED // 2
    for vocab_size in inputs:
        tp1 = run_cases(inputs[vocab_size], vocab_size)
        assert set(ranks[0][vocab_size]) == set(tp1) == {name for name, _, _ in CASES}
        for name, (loss, grad) in tp1.items():
            assert torch.all(grad[..., vocab_size:] == 0)
            for r, out in enumerate(ranks):
                close(out[vocab_size][name][0], loss)
                close(out[vocab_size][name][1], grad[..., r * half:(r + 1) * half])

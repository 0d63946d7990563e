"""Shared by tests/test_losses.py at TP=1 and by its TP=2 gloo workers: run every loss case on one
rank's vocab slice and return the per-token losses and that slice's gradients."""

from __future__ import annotations

import torch

from pare_nemo.losses import cross_entropy, kl_divergence, kl_divergence_stored, teacher_top_k

# (name, kind or "ce", kwargs); vocab sizes and shapes come from make_inputs
CASES = [
    ("ce", "ce", {}),
    ("ce_chunk7", "ce", {"chunk": 7}),
    ("forward", "forward", {}),
    ("reverse", "reverse", {}),
    ("jsd", "jsd", {"beta": 0.5}),
    ("jsd_0.1_T2", "jsd", {"beta": 0.1, "temperature": 2.0}),
    ("forward_T2_chunk7", "forward", {"temperature": 2.0, "chunk": 7}),
    ("forward_top10", "forward", {"top_k": 10}),
    ("reverse_top10_T0.5", "reverse", {"top_k": 10, "temperature": 0.5}),
    ("jsd_0.9_top10", "jsd", {"beta": 0.9, "top_k": 10}),
    ("forward_top_all", "forward", {"top_k": 10**6}),
    # the teacher's top k stored (teacher_top_k) and the divergence from them (offline KD)
    ("stored_forward_top10", "stored forward", {"top_k": 10}),
    ("stored_reverse_top10_T0.5", "stored reverse", {"top_k": 10, "temperature": 0.5}),
    ("stored_jsd_0.9_top10_T2", "stored jsd", {"beta": 0.9, "top_k": 10, "temperature": 2.0}),
    ("stored_forward_top_all", "stored forward", {"top_k": 10**6}),
]


def make_inputs(vocab_size: int, padded: int, s: int = 5, b: int = 3, seed: int = 0):
    """Student / teacher logits [s, b, padded] (fp32; padding columns set far above the rest),
    labels [s, b] and per-token weights for the backward."""
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(s, b, padded, generator=g)
    teacher = student + torch.randn(s, b, padded, generator=g)
    student[..., vocab_size:] = 40.0
    teacher[..., vocab_size:] = 50.0
    labels = torch.randint(0, vocab_size, (s, b), generator=g)
    weights = torch.rand(s, b, generator=g)
    return dict(student=student, teacher=teacher, labels=labels, weights=weights)


def run_cases(inputs, vocab_size, rank=0, world=1, tp_group=None, dtype=torch.float32):
    """{case: (per-token loss, gradient of sum(weights * loss) w.r.t. this rank's student slice)}"""
    v_local = inputs["student"].shape[-1] // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    out = {}
    for name, kind, kw in CASES:
        student = inputs["student"][..., cols].to(dtype).requires_grad_()
        teacher = inputs["teacher"][..., cols].to(dtype)
        if kind == "ce":
            loss = cross_entropy(student, inputs["labels"], vocab_size, tp_group=tp_group, **kw)
        elif kind.startswith("stored"):
            kw = dict(kw)
            stored = teacher_top_k(teacher, vocab_size, kw.pop("top_k"),
                                   kw.get("temperature", 1.0), tp_group=tp_group)
            loss = kl_divergence_stored(student, *stored, vocab_size, kind=kind.split()[1],
                                        tp_group=tp_group, **kw)
        else:
            loss = kl_divergence(student, teacher, vocab_size, kind=kind, tp_group=tp_group, **kw)
        (inputs["weights"] * loss).sum().backward()
        out[name] = (loss.detach(), student.grad)
    return out


def tp_worker(inputs_file, out_dir):
    """At TP=2 (gloo): for each {vocab_size: inputs} run every case on this rank's slice; save
    {vocab_size: {case: (loss, grad)}}."""
    from megatron.core import parallel_state as ps

    from pare_nemo.parallel import init_distributed

    init_distributed(tp=2)
    rank = ps.get_tensor_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group()
    out = {vocab_size: run_cases(inputs, vocab_size, rank, 2, group)
           for vocab_size, inputs in torch.load(inputs_file).items()}
    torch.save(out, f"{out_dir}/rank{rank}.pt")

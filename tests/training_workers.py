"""One training step's gradients of Pare's Megatron Olmo 3 at any TP/PP, for tests/test_training.py.
Functions live in a module so that ``torch.multiprocessing.spawn`` can import them."""

from __future__ import annotations

import torch


def megatron_grads(ckpt, tokens, mask, counts=None, megatron_finalize=False,
                   **overrides) -> dict[str, torch.Tensor]:
    """Load ``ckpt`` at the current TP/PP (model-parallel state initialized), run one forward and
    backward of the summed next-token NLL (real vocabulary) over ``tokens`` [N, S] with megatron's
    training schedule (micro-batches of 1) and return this pipeline stage's gradients as full
    (TP=1 layout) tensors, keyed by their TP=1, PP=1 names.

    Each TP rank holds the full logits (``parallel_output=False``) and computes the same loss once,
    megatron's convention: the backward through the logits gather keeps each rank's vocab slice,
    so no gradient may come out scaled by TP. Without megatron's DDP, what its
    ``finalize_model_grads`` does over TP is done here: the gradients of weights marked
    ``sequence_parallel`` (the RMS norms, which see s/tp tokens per rank) and of the QK norms
    (replicated full weights of which each rank uses its heads' slice, so each rank's gradient is
    that slice's part, zeros elsewhere) are summed over the TP group. ``megatron_finalize=True``
    runs megatron's own step for that instead (``_allreduce_non_tensor_model_parallel_grads``,
    called by ``finalize_model_grads``, without DDP: tests/test_train.py runs the whole DDP +
    distributed-optimizer loop), and checks that the QK norms' gradients come out
    identical on every TP rank (the replicas stay in sync).
    ``counts`` (a dict), if given, receives how many times each layer, core attention and MLP ran
    forward (recompute runs them again in backward)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pare_nemo.checkpoint import load_model
    from pare_nemo.losses import next_token_nll
    from pare_nemo.prune import full_tensor

    model, hf_config = load_model(ckpt, parallel_output=False, dtype=torch.float32,
                                  calculate_per_token_loss=True, **overrides)
    assert model.config.sequence_parallel == bool(overrides.get("sequence_parallel")), \
        "sequence parallelism was asked for but is not on"
    model.train()
    if counts is not None:
        def count(name):
            counts[name] = 0
            return lambda module, args, output: counts.update({name: counts[name] + 1})

        for name, m in model.named_modules():
            if name.endswith(("layers.0", "layers.3", "core_attention", "mlp")):
                m.register_forward_hook(count(name))
    vocab, (n, s) = hf_config.vocab_size, tokens.shape
    micro_batches = [(tokens[i:i + 1], mask[i:i + 1]) for i in range(n)]
    positions = torch.arange(s).expand(1, s)

    def forward_step(data_iterator, model):
        tok, msk = next(data_iterator)
        logits = model(input_ids=tok, position_ids=positions, attention_mask=None)

        def loss_func(logits):
            nll, count = next_token_nll(logits, tok, msk, vocab)
            # 3 values + calculate_per_token_loss: the schedule backprops the sum as it is
            return nll, count.int(), {"nll": nll.detach()}

        return logits, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=n, seq_length=s, micro_batch_size=1, forward_only=False)

    tp_group = ps.get_tensor_model_parallel_group()
    if megatron_finalize:
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import (
            _allreduce_non_tensor_model_parallel_grads,
        )

        model.ddp_config = DistributedDataParallelConfig()  # read there; what DDP would carry
        _allreduce_non_tensor_model_parallel_grads([model], model.config, tp_group)
        tp = ps.get_tensor_model_parallel_world_size()
        for name, p in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                copies = [torch.empty_like(p.grad) for _ in range(tp)]
                dist.all_gather(copies, p.grad.contiguous(), group=tp_group)
                assert all(torch.equal(c, copies[0]) for c in copies), f"{name}: TP replicas differ"
    elif ps.get_tensor_model_parallel_world_size() > 1:
        for name, p in model.named_parameters():
            if ((model.config.sequence_parallel and getattr(p, "sequence_parallel", False))
                    or "q_layernorm" in name or "k_layernorm" in name):
                dist.all_reduce(p.grad, group=tp_group)

    layers = model.decoder.layers
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        g = p.grad.detach()
        for attr in ("tensor_model_parallel", "partition_dim"):
            if hasattr(p, attr):
                setattr(g, attr, getattr(p, attr))
        if name.startswith("decoder.layers."):  # local layer index -> global
            i = int(name.split(".")[2])
            name = name.replace(f"layers.{i}.", f"layers.{layers[i].layer_number - 1}.", 1)
        grads[name] = full_tensor(g, name)
    return grads


def grads_worker(tp, pp, ckpt, tokens, mask, out_dir, overrides):
    """Spawned worker: gradients at (tp, pp); TP rank 0 of each stage writes its stage's part
    (at TP > 1 also the gradients after megatron's TP all-reduce of non-TP-sharded weights)."""
    from megatron.core import parallel_state as ps

    from pare_nemo.parallel import init_distributed

    init_distributed(tp, pp)
    for finalize in (False, True) if tp > 1 else (False,):
        grads = megatron_grads(ckpt, tokens, mask, megatron_finalize=finalize, **overrides)
        if ps.get_tensor_model_parallel_rank() == 0:
            name = "megatron_finalize" if finalize else "grads"
            torch.save(grads, f"{out_dir}/{name}{ps.get_pipeline_model_parallel_rank()}.pt")

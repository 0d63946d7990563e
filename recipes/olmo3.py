"""Named Olmo 3 recipes: small typed functions, each returning a whole stage config
(:mod:`pare_nemo.config`); config is data. ``pare <stage> recipe=<name> key=value …`` and
``nemo llm <stage> --factory <name> key=value … -y`` start from one and override any field.

A recipe sets what it decides (paths, data, shapes, schedule); everything else is the config's
default, which lives in pare_nemo/config.py only. The 7B recipes' paths are relative to the
repository root, the layout ``slurm/*.sh`` work in: ``pare import`` writes the teacher to
``checkpoints/olmo3-7b-instruct``, importance its scores to ``scores/``, prune each student to
``checkpoints/<its recipe>``, distillation to ``checkpoints/olmo3_7b_distill_<axis>``. The tiny
recipes are the demo's, in its working directory.
"""

from __future__ import annotations

from pare_nemo.config import (
    KD,
    Batch,
    Data,
    Depth,
    DistillConfig,
    Downstream,
    EvalConfig,
    Grid,
    ImportanceConfig,
    Latency,
    Models,
    Optimizer,
    Parallel,
    PruneConfig,
    Retrain,
    Rows,
    Run,
    SearchConfig,
    SparsifyConfig,
    Targets,
    TeacherLogitsConfig,
    Text,
)

OLMO3_7B = "allenai/Olmo-3-7B-Instruct"  # Hub id: 32 layers (3 sliding : 1 full), hidden 4096,
# FFN 11008, 32 MHA heads, vocab 100278 (padded to 100352 in Megatron), YaRN on full layers
TEACHER = "checkpoints/olmo3-7b-instruct"  # pare import's output (slurm/import.sh)
SCORES = "scores/olmo3-7b-instruct.pt"  # pare importance's output (slurm/importance.sh)
# Olmo 3 7B Instruct's own SFT mixture (Dolci Instruct SFT; chat records: the chat template)
IMPORTANCE_DATA = "allenai/Dolci-Instruct-SFT-7B"
# The distillation blend for Olmo 3: its own mid-training mix (Dolma 3 Dolmino) and SFT mixture,
# prepared with
#   pare prepare-data data=allenai/dolma3_dolmino_mix-100B-1125 output_prefix=data/dolmino
#   pare prepare-data data=allenai/Dolci-Instruct-SFT-7B output_prefix=data/dolci
# (Hub ids as published by Ai2; check them).
OLMO3_DISTILL_DATA = "0.7:data/dolmino,0.3:data/dolci"
# lm-eval tasks for the compression report: the papers' benchmarks, with IFEval for an Instruct
OLMO3_EVAL_TASKS = "mmlu,hellaswag,arc_challenge,gsm8k,ifeval"


def pruned(axis: str) -> str:
    return f"checkpoints/olmo3_7b_{axis}_4p5b"


def distilled(axis: str) -> str:
    return f"checkpoints/olmo3_7b_distill_{axis}"


SPARSE = "checkpoints/olmo3_7b_width_4p5b_2of4"  # the distilled width student, 2:4 sparse


# ---------------------------------------------------------------- importance


def olmo3_7b_importance() -> ImportanceConfig:
    """The Minitron defaults (1024 samples x 4096 tokens, seq=mean, batch=l2, 64 samples held out
    for layer_loss) on a slice of Olmo 3 7B Instruct's own SFT mixture; DP=8 on one node."""
    return ImportanceConfig(megatron_path=TEACHER, scores_path=SCORES,
                            text=Text(data=IMPORTANCE_DATA))


def tiny_importance(workdir: str = "pare_demo") -> ImportanceConfig:
    """The demo's tiny Olmo 3: 64 samples x 128 tokens of pydoc_data.topics, 16 for layer_loss."""
    return ImportanceConfig(megatron_path=f"{workdir}/megatron",
                            scores_path=f"{workdir}/scores/importance.pt",
                            text=Text(data="pydoc"),
                            rows=Rows(num_samples=64, seq_length=128, micro_batch_size=4),
                            layer_loss_samples=16)


# ---------------------------------------------------------------- pruning


def _prune(axis: str, targets: Targets, depth: Depth | None = None) -> PruneConfig:
    return PruneConfig(megatron_path=TEACHER, scores_path=SCORES, save_path=pruned(axis),
                       targets=targets, depth=depth or Depth())


def olmo3_7b_width_4p5b() -> PruneConfig:
    """Width only (the papers' preferred axis below 15B): hidden 4096 -> 3072, FFN 11008 -> 9216,
    heads 32 -> 24 (MHA), all 32 layers kept: 4.54B parameters (from 7.30B)."""
    return _prune("width", Targets(target_ffn_hidden_size=9216, target_num_attention_heads=24,
                                   target_hidden_size=3072))


def olmo3_7b_depth_4p5b() -> PruneConfig:
    """Depth only: 32 -> 18 layers, dropping the lowest LM-loss-when-skipped layers and never a
    full-attention layer (the seed's practice for sliding-window models): 4.46B parameters."""
    return _prune("depth", Targets(target_num_layers=18), Depth(protect_full_attention=True))


def olmo3_7b_combined_4p5b() -> PruneConfig:
    """Width and depth: 24 layers (full-attention layers protected), hidden 3584, FFN 9216, 32 MHA
    heads: 4.51B parameters."""
    return _prune("combined", Targets(target_ffn_hidden_size=9216, target_hidden_size=3584,
                                      target_num_layers=24), Depth(protect_full_attention=True))


def tiny_width(workdir: str = "pare_demo") -> PruneConfig:
    """The demo's width pruning: FFN 384 -> 256, hidden 128 -> 96."""
    return PruneConfig(megatron_path=f"{workdir}/megatron",
                       scores_path=f"{workdir}/scores/importance.pt",
                       save_path=f"{workdir}/pruned",
                       targets=Targets(target_ffn_hidden_size=256, target_hidden_size=96))


PRUNE_RECIPES = (olmo3_7b_width_4p5b, olmo3_7b_depth_4p5b, olmo3_7b_combined_4p5b)


# ---------------------------------------------------------------- architecture search


def olmo3_7b_search() -> SearchConfig:
    """The 4.5B family of Olmo 3 7B (4.5B +- 5% parameters): width (FFN, heads, hidden), depth (18
    to 32 layers, full-attention layers protected) and their combinations, ranked by zero-shot
    loss on 64 x 8192 tokens of the SFT mixture, priced by a roofline of an H100 decoding one
    sequence at 8k context (bf16); the best 3 each distilled 300 steps (1.9B tokens, the order of
    the Minitron paper's lightweight retraining) on the distillation blend and ranked again. TP=2
    (8 GPUs: DP=4), as distillation runs."""
    return SearchConfig(
        megatron_path=TEACHER, scores_path=SCORES, text=Text(data=IMPORTANCE_DATA), budget=4.5e9,
        rows=Rows(num_samples=64, seq_length=8192), parallel=Parallel(tp=2),
        grid=Grid(ffn=[8192, 9216, 11008], heads=[24, 28, 32], hidden=[3072, 3584, 4096],
                  layers=[18, 24, 28, 32]),
        depth=Depth(protect_full_attention=True),
        latency=Latency(hardware="h100", latency_context=8192),
        retrain=Retrain(retrain_top=3, retrain_steps=300, retrain_batch_size=768,
                        distill_data=OLMO3_DISTILL_DATA, retrain_warmup=30),
        out_path="scores/olmo3-7b-instruct-search.json")


def tiny_search(workdir: str = "pare_demo") -> SearchConfig:
    """The demo model (1.02M parameters) at 0.6M +- 10%: 8 candidates of FFN, heads, hidden and
    depth, priced on this machine (the CPU probed); the best 3 distilled 20 steps of 16 x 128
    tokens on the demo's prepared pydoc text and ranked again."""
    return SearchConfig(
        megatron_path=f"{workdir}/megatron", scores_path=f"{workdir}/scores/importance.pt",
        text=Text(data="pydoc"), budget=6e5, tolerance=0.1,
        rows=Rows(num_samples=16, seq_length=128, micro_batch_size=4),
        grid=Grid(ffn=[384, 256, 192], heads=[8, 4], hidden=[128, 96], layers=[4, 3]),
        latency=Latency(latency_context=128),
        retrain=Retrain(retrain_top=3, retrain_steps=20, retrain_batch_size=16, retrain_lr=3e-3,
                        retrain_warmup=2, distill_data=f"{workdir}/data/pydoc", score_samples=16),
        out_path=f"{workdir}/search/search.json")


# ---------------------------------------------------------------- distillation
# The papers' settings (Minitron, arXiv 2407.14679 / 2408.11796) are the config's defaults:
# sequence 8192, global batch 768 (6.3M tokens a step), LR 1e-4 -> 1e-5 cosine, 100 warmup steps;
# the recipes add ~94B tokens (15,000 steps; Llama-3.1-Minitron 4B used 94B), TP=2 (8 GPUs: DP=4),
# selective recompute, a checkpoint and a validation every 200 steps.


def _distill(axis: str, kd: KD) -> DistillConfig:
    return DistillConfig(
        models=Models(teacher_path=TEACHER, student_path=pruned(axis), recompute="selective"),
        data=Data(data=OLMO3_DISTILL_DATA),
        run=Run(save_path=distilled(axis), save_interval=200, eval_interval=200),
        batch=Batch(train_steps=15000), kd=kd, parallel=Parallel(tp=2))


def olmo3_7b_distill_width() -> DistillConfig:
    """The width-pruned 4.5B student: logit-only forward KL (the papers' choice when width was
    pruned)."""
    return _distill("width", KD())


def olmo3_7b_distill_depth() -> DistillConfig:
    """The depth-pruned 4.5B student: logit KL + cosine losses on every student layer's output
    (paired with the teacher layer it came from) + the embedding output, as the papers do when
    depth was pruned; PP=1 so every pair is on one stage."""
    return _distill("depth", KD(intermediate_loss="cosine", embedding_weight=1.0))


def olmo3_7b_distill_combined() -> DistillConfig:
    """The width+depth 4.5B student: logit KL + intermediate cosine losses compared on the teacher
    channels the student kept."""
    return _distill("combined", KD(intermediate_loss="cosine", embedding_weight=1.0,
                                   hidden_match="kept"))


def tiny_distill(workdir: str = "pare_demo") -> DistillConfig:
    """The demo's tiny student on CPU: 60 steps of 16 x 64 tokens, LR 3e-3, bf16. Logit KL plus
    cosine losses on every layer's output and on the embedding output (on the teacher channels the
    student kept): benchmarks/bench_kd_quality.py measured -0.04 held-out loss against logits alone
    for its width student, 3 seeds, beyond their spread (README, "Distillation quality")."""
    return DistillConfig(
        models=Models(teacher_path=f"{workdir}/megatron", student_path=f"{workdir}/pruned"),
        data=Data(data=f"{workdir}/data/pydoc"),
        run=Run(save_path=f"{workdir}/distilled", save_interval=20, eval_interval=20),
        batch=Batch(train_steps=60, global_batch_size=16, micro_batch_size=8, seq_length=64),
        optimizer=Optimizer(lr=3e-3, min_lr=3e-4, warmup_steps=5),
        kd=KD(intermediate_loss="cosine", embedding_weight=1.0))


def olmo3_7b_teacher_correction() -> DistillConfig:
    """Teacher correction (arXiv 2408.11796): fine-tune the teacher briefly on the distillation
    blend with CE alone (alpha=1: the same loop, no teacher beside it) before distilling from it;
    1000 steps (6.3B tokens), LR 1e-5 -> 1e-6 (a choice, not measured at 7B; the paper used ~127B
    tokens). Distill from the result with teacher_path=checkpoints/olmo3-7b-instruct-corrected."""
    return DistillConfig(
        models=Models(student_path=TEACHER, recompute="selective"),
        data=Data(data=OLMO3_DISTILL_DATA),
        run=Run(save_path=f"{TEACHER}-corrected", save_interval=200, eval_interval=200),
        batch=Batch(train_steps=1000), optimizer=Optimizer(lr=1e-5, min_lr=1e-6),
        kd=KD(alpha=1.0), parallel=Parallel(tp=2))


def olmo3_7b_distill_sparse() -> DistillConfig:
    """Masked distillation of the 2:4-sparse width student (seed 003: sparsify, then distill
    training only the weights left): the width recipe from ``olmo3_7b_sparsify``'s checkpoint,
    its zeros kept (``mask=``), 2000 steps (12.6B tokens; a choice, not measured at 7B)."""
    cfg = olmo3_7b_distill_width()
    cfg.models.student_path = cfg.models.mask = SPARSE
    cfg.run.save_path = distilled("width_2of4")
    cfg.batch.train_steps = 2000
    return cfg


DISTILL_RECIPES = (olmo3_7b_distill_width, olmo3_7b_distill_depth, olmo3_7b_distill_combined,
                   olmo3_7b_teacher_correction, olmo3_7b_distill_sparse, tiny_distill)


# ---------------------------------------------------------------- sparsity


def olmo3_7b_sparsify() -> SparsifyConfig:
    """2:4 sparsity (the pattern sparse tensor cores run) of the distilled width student by Wanda,
    calibrated on 128 x 4096 tokens of the SFT mixture; then ``olmo3_7b_distill_sparse``."""
    return SparsifyConfig(megatron_path=distilled("width"), save_path=SPARSE,
                          text=Text(data=IMPORTANCE_DATA), method="wanda", pattern="2:4")


# ---------------------------------------------------------------- offline teacher logits


def _teacher_logits_for(d: DistillConfig, output: str, top_k: int) -> TeacherLogitsConfig:
    """Store the teacher's top k for exactly the rows the distillation ``d`` reads (its data,
    split, seed, rows and validation rows), at its temperature."""
    return TeacherLogitsConfig(
        teacher_path=d.models.teacher_path, output=output, data=d.data, batch=d.batch,
        valid_samples=d.run.eval_samples if d.run.eval_interval else 0, top_k=top_k,
        temperature=d.kd.temperature, dtype=d.models.dtype)


def olmo3_7b_teacher_logits() -> TeacherLogitsConfig:
    """Olmo 3 7B's top 32 (fp16: 200 bytes per token) over the rows olmo3_7b_distill_width reads,
    for offline distillation (pare distill recipe=olmo3_7b_distill_width teacher_path=none
    teacher_logits=data/olmo3-7b-top32). Forward only: TP=1, DP=8 on one node."""
    return _teacher_logits_for(olmo3_7b_distill_width(), "data/olmo3-7b-top32", top_k=32)


def tiny_teacher_logits(workdir: str = "pare_demo") -> TeacherLogitsConfig:
    """The demo teacher's top 32 over the rows tiny_distill reads."""
    return _teacher_logits_for(tiny_distill(workdir), f"{workdir}/teacher_top32", top_k=32)


# ---------------------------------------------------------------- evaluation


def _eval(axis: str) -> EvalConfig:
    """Teacher, pruned and distilled, on 256 x 8192 tokens of the distillation blend's
    validation split (held out from it); DP=8 on one node."""
    return EvalConfig(
        checkpoints=f"teacher:{TEACHER},pruned:{pruned(axis)},distilled:{distilled(axis)}",
        data=OLMO3_DISTILL_DATA, output=f"eval/olmo3_7b_{axis}",
        rows=Rows(num_samples=256, seq_length=8192),
        downstream=Downstream(tasks=OLMO3_EVAL_TASKS, max_new_tokens=128))


def olmo3_7b_eval_width() -> EvalConfig:
    """Olmo 3 7B vs its width-pruned 4.5B student before and after distillation: held-out loss on
    256 x 8192 tokens of the distillation blend's validation split; DP=8 on one node."""
    return _eval("width")


def olmo3_7b_eval_depth() -> EvalConfig:
    """Olmo 3 7B vs its depth-pruned 4.5B student before and after distillation."""
    return _eval("depth")


def olmo3_7b_eval_combined() -> EvalConfig:
    """Olmo 3 7B vs its width+depth-pruned 4.5B student before and after distillation."""
    return _eval("combined")


EVAL_RECIPES = (olmo3_7b_eval_width, olmo3_7b_eval_depth, olmo3_7b_eval_combined)

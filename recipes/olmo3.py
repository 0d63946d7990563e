"""Named Olmo 3 recipes: small typed functions, config as data.

The conversion recipe names the checkpoint and where it goes; later stages (importance, prune,
distill) add theirs here. Each returns a plain dataclass that ``pare``/``nemo llm`` commands take.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Olmo3Checkpoint:
    hf_id: str  # Hub id or local directory
    megatron_path: str
    tensor_parallel: int  # a layout that fits one 8xH100 node for forward-only stages
    pipeline_parallel: int
    params: str  # parameter count, for the record


def olmo3_7b_instruct(root: str = "checkpoints") -> Olmo3Checkpoint:
    """Olmo 3 7B Instruct: 32 layers (3 sliding : 1 full), hidden 4096, FFN 11008, 32 MHA heads,
    vocab 100278 (padded to 100352 in Megatron), YaRN (factor 8) on the full-attention layers."""
    return Olmo3Checkpoint("allenai/Olmo-3-7B-Instruct", f"{root}/olmo3-7b-instruct", 1, 1, "7.3B")


@dataclass(frozen=True)
class ImportanceRecipe:
    """Arguments of ``pare importance`` (the Minitron defaults: 1024 samples, seq=mean, batch=l2)."""

    data: str
    num_samples: int
    seq_length: int
    seq: str
    batch: str
    layer_loss_samples: int
    tp: int
    pp: int


def olmo3_7b_importance() -> ImportanceRecipe:
    """A 1024-sample slice of Olmo 3 7B Instruct's own SFT mixture (Dolci Instruct SFT, chat data:
    the tokenizer's chat template is applied), packed into 4096-token rows; DP=8 on one node."""
    return ImportanceRecipe(data="allenai/Dolci-Instruct-SFT-7B", num_samples=1024,
                            seq_length=4096, seq="mean", batch="l2", layer_loss_samples=64,
                            tp=1, pp=1)


@dataclass(frozen=True)
class PruneRecipe:
    """Arguments of ``pare prune`` / ``nemo llm prune --factory <name>`` (NeMo PruningConfig names).
    Paths (megatron_path, scores_path, save_path) are given on the command line."""

    target_ffn_hidden_size: int | None = None
    target_num_attention_heads: int | None = None
    target_num_query_groups: int | None = None
    target_hidden_size: int | None = None
    target_num_layers: int | None = None
    layer_metric: str = "layer_loss"
    protect_full_attention: bool = False


def olmo3_7b_width_4p5b() -> PruneRecipe:
    """Width only (the papers' preferred axis below 15B): hidden 4096 -> 3072, FFN 11008 -> 9216,
    heads 32 -> 24 (MHA), all 32 layers kept: 4.54B parameters (from 7.30B)."""
    return PruneRecipe(target_ffn_hidden_size=9216, target_num_attention_heads=24,
                       target_hidden_size=3072)


def olmo3_7b_depth_4p5b() -> PruneRecipe:
    """Depth only: 32 -> 18 layers, dropping the lowest LM-loss-when-skipped layers and never a
    full-attention layer (the seed's practice for sliding-window models): 4.46B parameters."""
    return PruneRecipe(target_num_layers=18, layer_metric="layer_loss", protect_full_attention=True)


def olmo3_7b_combined_4p5b() -> PruneRecipe:
    """Width and depth: 24 layers (full-attention layers protected), hidden 3584, FFN 9216, 32 MHA
    heads: 4.51B parameters."""
    return PruneRecipe(target_ffn_hidden_size=9216, target_hidden_size=3584, target_num_layers=24,
                       layer_metric="layer_loss", protect_full_attention=True)


PRUNE_RECIPES = (olmo3_7b_width_4p5b, olmo3_7b_depth_4p5b, olmo3_7b_combined_4p5b)


@dataclass(frozen=True)
class DistillRecipe:
    """Arguments of ``pare distill`` / ``nemo llm distill --factory <name>``. Paths (teacher_path,
    student_path, data, save_path) are given on the command line; ``data`` is what
    ``pare prepare-data`` wrote (one prefix, or ``weight:prefix,weight:prefix`` for a blend)."""

    train_steps: int
    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    lr: float
    min_lr: float
    warmup_steps: int
    kd: str = "forward"
    temperature: float = 1.0
    alpha: float = 0.0
    intermediate_loss: str = "none"
    intermediate_weight: float = 1.0
    embedding_weight: float = 0.0
    hidden_match: str = "kept"
    tp: int = 1
    pp: int = 1
    recompute: str = "selective"
    save_interval: int = 200
    keep_last: int = 2
    eval_interval: int = 200


# The papers' distillation settings (Minitron, arXiv 2407.14679 / 2408.11796): sequence 8192,
# global batch 768 (6.3M tokens a step), LR 1e-4 -> 1e-5 cosine, 100 warmup steps, ~94B tokens
# (15,000 steps; Llama-3.1-Minitron 4B used 94B). The blend for Olmo 3: its own mid-training mix
# (Dolma 3 Dolmino) and SFT mixture (Dolci Instruct SFT), prepared with
#   pare prepare-data data=allenai/dolma3_dolmino_mix-100B-1125 output_prefix=data/dolmino
#   pare prepare-data data=allenai/Dolci-Instruct-SFT-7B output_prefix=data/dolci
# and given as data=0.7:data/dolmino,0.3:data/dolci (Hub ids as published by Ai2; check them).
OLMO3_DISTILL_DATA = "0.7:data/dolmino,0.3:data/dolci"
_PAPER = dict(train_steps=15000, global_batch_size=768, micro_batch_size=1, seq_length=8192,
              lr=1e-4, min_lr=1e-5, warmup_steps=100)


def olmo3_7b_distill_width() -> DistillRecipe:
    """The width-pruned 4.5B student: logit-only forward KL (the papers' choice when width was
    pruned); TP=2 (8 GPUs: DP=4), selective recompute."""
    return DistillRecipe(**_PAPER, tp=2)


def olmo3_7b_distill_depth() -> DistillRecipe:
    """The depth-pruned 4.5B student: logit KL + cosine losses on every student layer's output
    (paired with the teacher layer it came from) + the embedding output, as the papers do when
    depth was pruned; PP=1 so every pair is on one stage (TP=2, DP=4)."""
    return DistillRecipe(**_PAPER, tp=2, intermediate_loss="cosine", intermediate_weight=1.0,
                         embedding_weight=1.0)


def olmo3_7b_distill_combined() -> DistillRecipe:
    """The width+depth 4.5B student: logit KL + intermediate cosine losses compared on the teacher
    channels the student kept; TP=2, DP=4."""
    return DistillRecipe(**_PAPER, tp=2, intermediate_loss="cosine", intermediate_weight=1.0,
                         embedding_weight=1.0, hidden_match="kept")


def tiny_distill() -> DistillRecipe:
    """The demo's tiny student on CPU: 60 steps of 16 x 64 tokens, LR 3e-3, bf16."""
    return DistillRecipe(train_steps=60, global_batch_size=16, micro_batch_size=8, seq_length=64,
                         lr=3e-3, min_lr=3e-4, warmup_steps=5, recompute="none",
                         save_interval=20, eval_interval=20)


DISTILL_RECIPES = (olmo3_7b_distill_width, olmo3_7b_distill_depth, olmo3_7b_distill_combined,
                   tiny_distill)


# lm-eval tasks for the compression report (pare_nemo/report.py): the papers' benchmarks, with
# IFEval for an Instruct model
OLMO3_EVAL_TASKS = "mmlu,hellaswag,arc_challenge,gsm8k,ifeval"


@dataclass(frozen=True)
class EvalRecipe:
    """Arguments of ``pare eval`` / ``nemo llm eval --factory <name>``: the teacher, the pruned
    student and the distilled one, named, at the paths ``slurm/prune.sh`` and ``slurm/distill.sh``
    write by default, on the validation split of the distillation data (held out from it)."""

    checkpoints: str  # name:path,name:path
    data: str
    output: str
    num_samples: int = 256
    seq_length: int = 8192
    micro_batch_size: int = 1
    tp: int = 1
    pp: int = 1
    tasks: str = OLMO3_EVAL_TASKS
    max_new_tokens: int = 128


def _eval_checkpoints(axis: str) -> str:
    """Teacher, pruned (slurm/prune.sh's SAVE_PATH) and distilled (slurm/distill.sh's)."""
    return (f"teacher:checkpoints/olmo3-7b-instruct,pruned:checkpoints/olmo3_7b_{axis}_4p5b,"
            f"distilled:checkpoints/olmo3_7b_distill_{axis}")


def olmo3_7b_eval_width() -> EvalRecipe:
    """Olmo 3 7B vs its width-pruned 4.5B student before and after distillation: held-out loss on
    256 x 8192 tokens of the distillation blend's validation split; DP=8 on one node."""
    return EvalRecipe(checkpoints=_eval_checkpoints("width"), data=OLMO3_DISTILL_DATA,
                      output="eval/olmo3_7b_width")


def olmo3_7b_eval_depth() -> EvalRecipe:
    """Olmo 3 7B vs its depth-pruned 4.5B student before and after distillation."""
    return EvalRecipe(checkpoints=_eval_checkpoints("depth"), data=OLMO3_DISTILL_DATA,
                      output="eval/olmo3_7b_depth")


def olmo3_7b_eval_combined() -> EvalRecipe:
    """Olmo 3 7B vs its width+depth-pruned 4.5B student before and after distillation."""
    return EvalRecipe(checkpoints=_eval_checkpoints("combined"), data=OLMO3_DISTILL_DATA,
                      output="eval/olmo3_7b_combined")


EVAL_RECIPES = (olmo3_7b_eval_width, olmo3_7b_eval_depth, olmo3_7b_eval_combined)

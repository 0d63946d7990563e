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

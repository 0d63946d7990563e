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

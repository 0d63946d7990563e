import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tokenizer():
    from pare_nemo.tiny import make_tokenizer

    return make_tokenizer(512)


@pytest.fixture(scope="session")
def hf_gqa(tmp_path_factory, tokenizer):
    """Tiny GQA Olmo 3 (4 heads, 2 KV heads; 3 sliding : 1 full; YaRN on the full layer)."""
    from pare_nemo.tiny import make_tiny_olmo3

    return make_tiny_olmo3(tmp_path_factory.mktemp("hf") / "gqa", tokenizer=tokenizer,
                           num_kv_heads=2, num_layers=4, sliding_window=8)


@pytest.fixture(scope="session")
def megatron_gqa(tmp_path_factory, hf_gqa):
    from conversion.convert import import_hf

    return import_hf(str(hf_gqa), str(tmp_path_factory.mktemp("mg") / "gqa"))


@pytest.fixture(scope="session")
def tokens():
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tokenizer):
    """A small Olmo 3 trained briefly on real text (pydoc_data.topics): HF dir, Megatron checkpoint,
    and held-out tokens to measure loss on."""
    from conversion.convert import import_hf
    from pare_nemo.data import load_token_data
    from pare_nemo.tiny import random_olmo3, tiny_config, train_briefly

    torch.manual_seed(0)
    data = load_token_data("pydoc", tokenizer, 1200, 64)
    train, held = data.tokens[:1100], data.tokens[1100:]
    cfg = tiny_config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                      num_layers=4, num_heads=4, num_kv_heads=4, sliding_window=16)
    cfg.pad_token_id, cfg.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model = train_briefly(random_olmo3(cfg, seed=0), train, steps=400)
    root = tmp_path_factory.mktemp("trained")
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    mg = import_hf(str(root / "hf"), str(root / "mg"))
    return {"hf": root / "hf", "mg": mg, "held": held, "root": root}


@pytest.fixture(scope="session")
def distill_env(trained, tmp_path_factory):
    """Teacher, width-pruned and depth-pruned students, a random-init student of the width
    student's shape, the prepared data and held-out tokens."""
    from transformers import AutoTokenizer, Olmo3ForCausalLM

    from conversion.convert import import_hf
    from pare_nemo.checkpoint import read_model_config
    from pare_nemo.data import prepare_data
    from pare_nemo.importance import importance
    from pare_nemo.prune import prune
    from pare_nemo.tiny import pydoc_text

    root = tmp_path_factory.mktemp("distill")
    teacher = str(trained["mg"])
    importance(megatron_path=teacher, data="pydoc", scores_path=str(root / "scores.pt"),
               num_samples=64, seq_length=64, micro_batch_size=8, layer_loss_samples=16,
               report=False)
    width = prune(megatron_path=teacher, scores_path=str(root / "scores.pt"),
                  save_path=str(root / "width"), target_ffn_hidden_size=128, target_hidden_size=48)
    depth = prune(megatron_path=teacher, scores_path=str(root / "scores.pt"),
                  save_path=str(root / "depth"), target_num_layers=2)
    depth3 = prune(megatron_path=teacher, scores_path=str(root / "scores.pt"),
                   save_path=str(root / "depth3"), target_num_layers=3)
    docs = pydoc_text().split("\n\n\n")
    (root / "train.txt").write_text("\n\n\n".join(docs[:-20]))
    prepare_data(str(root / "train.txt"), str(Path(teacher) / "tokenizer"), str(root / "data"))
    tok = AutoTokenizer.from_pretrained(Path(teacher) / "tokenizer")
    ids = tok("\n\n\n".join(docs[-20:])).input_ids
    held = torch.tensor(ids[: len(ids) // 64 * 64]).reshape(-1, 64)[:64]
    # the width student's architecture from random init (transformers' init), as a checkpoint
    cfg, _, _ = read_model_config(width)
    torch.manual_seed(0)
    Olmo3ForCausalLM(cfg).save_pretrained(root / "scratch_hf")
    tok.save_pretrained(root / "scratch_hf")
    scratch = import_hf(str(root / "scratch_hf"), str(root / "scratch"))
    return dict(root=root, teacher=teacher, width=width, depth=depth, depth3=depth3,
                data=str(root / "data"),
                held=held, scratch=scratch)


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A test that leaves torch.distributed initialized makes later tests reuse its group (and keep
    its gloo threads): fail that test, and clean up for the next. A group that a module- or
    session-scoped fixture set up before the test (tests/gpu's parity models) is the fixture's to
    end, not the test's."""
    import sys

    def initialized():
        return "torch.distributed" in sys.modules and torch.distributed.is_initialized()

    before = initialized()
    yield
    if not before and initialized():
        from pare_nemo.parallel import destroy_distributed

        destroy_distributed()
        pytest.fail("the test left torch.distributed initialized")

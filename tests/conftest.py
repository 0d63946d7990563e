import os
import warnings

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

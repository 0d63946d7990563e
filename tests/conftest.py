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

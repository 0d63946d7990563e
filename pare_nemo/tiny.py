"""Tiny Olmo 3 models and real text for the demo, tests and benchmarks (no hub access needed).

Text is CPython's own ``pydoc_data.topics`` (about 465 KB of English prose, on every machine); the
tokenizer is a byte-level BPE trained on it with the ``tokenizers`` library.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def make_tokenizer(vocab_size: int = 1024, text: str | None = None):
    """A byte-level BPE of ``vocab_size`` trained on ``text`` (default: pydoc_data.topics)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = text or pydoc_text()
    tok.train_from_iterator((text[i:i + 4096] for i in range(0, len(text), 4096)), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(vocab_size: int = 1024, hidden_size: int = 64, intermediate_size: int = 128,
                num_layers: int = 4, num_heads: int = 4, num_kv_heads: int | None = None,
                head_dim: int | None = None, sliding_window: int = 16, yarn: bool = True,
                layer_types: list[str] | None = None, dtype: str = "float32", **kw):
    """An Olmo3Config shaped like the 7B (3 sliding : 1 full, YaRN on full layers), only small."""
    from transformers import Olmo3Config

    layer_types = layer_types or [
        "full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(num_layers)
    ]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}}
    rope["full_attention"] = (
        {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0, "beta_fast": 32.0,
         "beta_slow": 1.0, "original_max_position_embeddings": 128, "attention_factor": 1.2079}
        if yarn else {"rope_type": "default", "rope_theta": 500000.0}
    )
    return Olmo3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads, head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=1024, sliding_window=sliding_window, layer_types=layer_types,
        rope_parameters=rope, rms_norm_eps=1e-6, pad_token_id=1, eos_token_id=0,
        bos_token_id=None, tie_word_embeddings=False, dtype=dtype, **kw,
    )


def random_olmo3(config, seed: int = 0):
    """A random Olmo3ForCausalLM whose norm weights are also random (so any mix-up shows)."""
    from transformers import Olmo3ForCausalLM

    torch.manual_seed(seed)
    model = Olmo3ForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def make_tiny_olmo3(path: str | Path, seed: int = 0, tokenizer=None, **config_kw) -> Path:
    """Write a tiny random Olmo 3 HF directory (safetensors, config, tokenizer) to ``path``."""
    path = Path(path)
    tokenizer = tokenizer or make_tokenizer(config_kw.get("vocab_size", 1024))
    config_kw.setdefault("vocab_size", len(tokenizer))
    config = tiny_config(**config_kw)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = random_olmo3(config, seed)
    model.to(getattr(torch, config_kw.get("dtype", "float32")))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_briefly(model, tokens: torch.Tensor, steps: int = 300, batch: int = 16, lr: float = 3e-3,
                  seed: int = 0):
    """A few hundred AdamW steps of next-token prediction, so importance has structure to find."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, tokens.shape[0], (batch,), generator=g)
        loss = model(tokens[idx], labels=tokens[idx]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()

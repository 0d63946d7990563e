"""prepare_data: documents -> megatron-core indexed dataset (.bin/.idx), the same for any number of
workers; training_dataset / batch_at: megatron's GPTDataset rows, deterministic and resumable."""

import json

import numpy as np
import pytest
import torch

from pare_nemo import data as D
from pare_nemo.data import DataError, batch_at, prepare_data, training_dataset
from pare_nemo.olmo3.model import document_ids
from pare_nemo.tiny import pydoc_text

S, GBS = 64, 16


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory, tok_dir):
    prefix = tmp_path_factory.mktemp("data") / "pydoc"
    meta = prepare_data("pydoc", tok_dir, str(prefix))
    return str(prefix), meta


def _docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].astype(np.int64).tolist() for i in range(len(ds))], ds


def test_indexed_dataset_holds_the_documents_and_eos(pydoc, tokenizer):
    prefix, meta = pydoc
    docs, ds = _docs(prefix)
    want = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            for t in pydoc_text().split("\n\n\n")]
    assert docs == want  # one document per record, EOS appended, nothing else
    assert len(docs) == 223 and ds.index.dtype == np.uint16
    assert list(ds.document_indices) == list(range(len(docs) + 1))
    written = json.loads(open(prefix + ".json").read())
    assert written == meta
    assert (meta["documents"], meta["tokens"]) == (223, sum(map(len, want)))
    assert (meta["vocab_size"], meta["eos_token_id"]) == (512, tokenizer.eos_token_id)
    assert meta["tokenizer_sha256"] == D.tokenizer_fingerprint(tokenizer)


def test_workers_give_identical_files(pydoc, tok_dir, tmp_path, monkeypatch):
    prefix, meta = pydoc
    monkeypatch.setattr(D, "_CHUNK", 16)  # 14 chunks over 2 processes, written in order
    meta2 = prepare_data("pydoc", tok_dir, str(tmp_path / "w2"), num_workers=2)
    for ext in (".bin", ".idx"):
        assert open(prefix + ext, "rb").read() == (tmp_path / f"w2{ext}").read_bytes()
    assert meta2["tokens"] == meta["tokens"]
    # limit_docs takes the first documents
    prepare_data("pydoc", tok_dir, str(tmp_path / "few"), limit_docs=5)
    assert _docs(str(tmp_path / "few"))[0] == _docs(prefix)[0][:5]


def test_chat_records_use_the_template(tok_dir, tokenizer, tmp_path):
    msgs = [{"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": "A mutable sequence."}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"body": "plain text"}) + "\n")
    meta = prepare_data(str(f), tok_dir, str(tmp_path / "chat"), text_key="body")
    docs, _ = _docs(str(tmp_path / "chat"))
    eos = tokenizer.eos_token_id
    chat = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert chat.startswith("<|im_start|>user\n")
    assert docs == [tokenizer(chat, add_special_tokens=False).input_ids + [eos],
                    tokenizer("plain text", add_special_tokens=False).input_ids + [eos]]
    assert docs[0][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert meta["documents"] == 2


def _nothing_written(d, name):
    return not [p for p in d.iterdir() if p.name.startswith((name, f".{name}"))]


def test_bad_input_is_refused_and_leaves_nothing(pydoc, tok_dir, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(str(tmp_path / "missing.jsonl"), tok_dir, out)
    with pytest.raises(DataError, match="tokenizer .*no-tokenizer does not exist"):
        prepare_data("pydoc", str(tmp_path / "no-tokenizer"), out)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare_data(str(tmp_path / "empty.jsonl"), tok_dir, out)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no documents"):
        prepare_data(str(tmp_path / "blank.txt"), tok_dir, out)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        prepare_data(str(tmp_path / "x.csv"), tok_dir, out)
    with pytest.raises(DataError, match="num_workers"):
        prepare_data("pydoc", tok_dir, out, num_workers=0)
    # a bad record half-way: an error naming it, no output and no partial files
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a"}, {"text": "b"}, {"x": 1}]))
    with pytest.raises(DataError, match="record 2: a record has neither 'text' nor 'messages'"):
        prepare_data(str(bad), tok_dir, out)
    assert _nothing_written(tmp_path, "out")
    # an existing output is refused unless overwrite
    prefix, _ = pydoc
    with pytest.raises(DataError, match="already exist.*overwrite"):
        prepare_data("pydoc", tok_dir, prefix, limit_docs=3)
    prepare_data(str(bad), tok_dir, out, limit_docs=2)
    prepare_data("pydoc", tok_dir, out, limit_docs=3, overwrite=True)
    assert json.loads(open(out + ".json").read())["documents"] == 3


def test_rows_are_the_shuffled_document_stream(pydoc, tmp_path, tokenizer):
    prefix, meta = pydoc
    eos = tokenizer.eos_token_id
    train, valid = training_dataset(prefix, S, 200, GBS, seed=1, split="99,1,0", eos_token_id=eos,
                                    cache_dir=str(tmp_path / "c1"))
    docs, _ = _docs(prefix)
    assert max(train.indices) < len(docs) - 2 and min(valid.indices) >= len(docs) - 2  # 99,1,0
    # row i is chunk shuffle_index[i] of the (shuffled) documents' concatenation: no overlap, no gap
    stream = np.concatenate([docs[d] for d in train.document_index])
    for i in range(0, len(train), 97):
        j = int(train.shuffle_index[i])
        assert train[i]["tokens"].tolist() == stream[j * S:(j + 1) * S].tolist()
    assert len(train) == len(stream) // S
    row = train[0]["tokens"]
    assert row.shape == (S,) and row.dtype == torch.int64
    assert len(valid) == sum(len(docs[d]) for d in valid.indices) // S > 0
    # EOS marks the document boundaries inside rows
    ids = document_ids(torch.stack([train[i]["tokens"] for i in range(50)]), eos)
    assert ids.max() > 0


def rows(ds, n):
    return torch.stack([ds[i]["tokens"] for i in range(n)])


def test_batches_are_deterministic_and_resumable(pydoc, tmp_path, tokenizer):
    prefix, _ = pydoc
    eos = tokenizer.eos_token_id
    train, _ = training_dataset(prefix, S, 200, GBS, seed=1, split="99,1,0", eos_token_id=eos,
                                cache_dir=str(tmp_path / "c1"))
    # the same seed built again from scratch (another cache) gives the same rows; another seed not
    again, _ = training_dataset(prefix, S, 200, GBS, seed=1, split="99,1,0", eos_token_id=eos,
                                cache_dir=str(tmp_path / "c2"))
    other, _ = training_dataset(prefix, S, 200, GBS, seed=2, split="99,1,0", eos_token_id=eos,
                                cache_dir=str(tmp_path / "c2"))
    assert torch.equal(rows(train, 64), rows(again, 64))
    assert not torch.equal(rows(train, 64), rows(other, 64))
    # step k of an uninterrupted run over 2 DP ranks = global rows [k*GBS, (k+1)*GBS), and a run
    # resumed at consumed_samples = k*GBS (fresh dataset objects, loaded from the cache) gets them
    resumed, _ = training_dataset(prefix, S, 200, GBS, seed=1, split="99,1,0", eos_token_id=eos,
                                  cache_dir=str(tmp_path / "c1"))
    every = rows(train, 4 * GBS)
    for k in range(4):
        parts = [batch_at(train, k * GBS, GBS, r, 2) for r in range(2)]
        assert all(p.tokens.shape == (GBS // 2, S) and p.mask.all() for p in parts)
        assert torch.equal(torch.cat([p.tokens for p in parts]), every[k * GBS:(k + 1) * GBS])
        assert torch.equal(batch_at(resumed, k * GBS, GBS, 1, 2).tokens, parts[1].tokens)
    with pytest.raises(DataError, match="past the"):
        batch_at(train, len(train) - GBS + 1, GBS)
    with pytest.raises(DataError, match="multiple of dp_size"):
        batch_at(train, 0, GBS, 0, 3)


def test_blend_follows_the_weights(pydoc, tok_dir, tmp_path, tokenizer):
    prefix, _ = pydoc
    small = str(tmp_path / "small")
    prepare_data("pydoc", tok_dir, small, limit_docs=60)
    n = 400
    train, valid = training_dataset([prefix, small], S, n, GBS, seed=3, split="99,1,0",
                                    eos_token_id=tokenizer.eos_token_id, weights=[1, 3],
                                    valid_samples=8, cache_dir=str(tmp_path / "c"))
    which = np.array([train[i]["dataset_id"] for i in range(n)])
    assert len(train) == n and len(valid) == 8
    assert abs((which == 1).sum() - 0.75 * n) <= 1  # megatron's blending is exact to a sample


def test_too_little_or_wrong_data_is_refused(pydoc, tok_dir, tmp_path, tokenizer):
    prefix, meta = pydoc
    eos = tokenizer.eos_token_id
    rows = meta["tokens"] // S
    with pytest.raises(DataError, match="fewer than one global batch"):
        training_dataset(prefix, S, 10, rows + 1, seed=0, eos_token_id=eos, split="1,0,0",
                         cache_dir=str(tmp_path / "c"))
    few = str(tmp_path / "few")
    prepare_data("pydoc", tok_dir, few, limit_docs=20)
    with pytest.raises(DataError, match="valid split .* holds 0 documents"):
        training_dataset(few, S, 10, 1, seed=0, split="99,1,0", eos_token_id=eos,
                         cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="no .*missing.bin"):
        training_dataset(str(tmp_path / "missing"), S, 10, 1, seed=0, split="99,1,0",
                         eos_token_id=eos)
    with pytest.raises(DataError, match="EOS id 0, not 5"):
        training_dataset(prefix, S, 10, 1, seed=0, split="99,1,0", eos_token_id=5)
    with pytest.raises(DataError, match="valid_samples"):
        training_dataset([prefix, few], S, 10, 1, seed=0, split="99,1,0", eos_token_id=eos,
                         weights=[1, 1])
    with pytest.raises(DataError, match="split="):
        training_dataset(prefix, S, 10, 1, seed=0, eos_token_id=eos, split="0,1,0")
    assert not (tmp_path / "c").exists()  # refused before megatron built anything

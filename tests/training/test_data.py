import json

import pytest
import torch

from default_moe.training import data
from default_moe.training.data import DataError


def test_builtin_split_is_deterministic_disjoint_and_file_level():
    root = data.stdlib_folder()
    files = [p.relative_to(root).as_posix() for p in data.stdlib_files()]
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and not [f for f in files if f.startswith(("test/", "encodings/", "site-packages/"))]
    validation = [f for f in files if data.is_validation_file(f, 0.05)]
    # Hash split: roughly the asked fraction, and the same answer every time.
    assert 0.02 < len(validation) / len(files) < 0.1
    assert validation == [f for f in files if data.is_validation_file(f, 0.05)]
    assert all(not data.is_validation_file(f, 0.0) for f in files)

    train = data.builtin_corpus("train", max_chars=200_000)
    valid = data.builtin_corpus("validation", max_chars=200_000)
    assert sum(map(len, train)) == 200_000 and sum(map(len, valid)) == 200_000
    assert train == data.builtin_corpus("train", max_chars=200_000)
    assert not set(train) & set(valid)


def test_builtin_corpus_rejects_unknown_split():
    with pytest.raises(DataError, match="unknown split"):
        data.builtin_corpus("test")


def test_tokenizer_is_byte_level_roundtrip_and_saves(tmp_path):
    tokenizer = data.train_tokenizer(data.builtin_corpus("train", max_chars=300_000), vocab_size=512)
    assert len(tokenizer) == 512
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == data.EOS_TOKEN and tokenizer.pad_token_id == tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path)
    reloaded = data.load_tokenizer(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids


def test_tokenizer_rejects_tiny_vocab_and_empty_text():
    with pytest.raises(DataError, match="too small"):
        data.train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(DataError, match="empty"):
        data.train_tokenizer(["", ""], vocab_size=512)


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_tokenizer(data.builtin_corpus("train", max_chars=200_000), vocab_size=400)


def test_pack_joins_documents_with_eos_and_drops_the_tail(tokenizer):
    texts = ["a = 1\n" * 20, "b = 2\n" * 7]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    blocks = data.pack(texts, tokenizer, seq_len=8)
    assert blocks.shape == (sum(lengths) // 8, 8) and blocks.dtype == torch.long
    flat = blocks.flatten().tolist()
    assert flat[lengths[0] - 1] == tokenizer.eos_token_id
    budget = data.pack(texts, tokenizer, seq_len=8, max_tokens=20)
    assert budget.shape == (2, 8)
    dataset = data.PackedDataset(blocks)
    item = dataset[0]
    assert torch.equal(item["input_ids"], item["labels"]) and dataset.num_tokens == blocks.numel()


def test_pack_errors(tokenizer):
    with pytest.raises(DataError, match="yields no full sequence"):
        data.pack(["x = 1"], tokenizer, seq_len=64)
    with pytest.raises(DataError, match="too short"):
        data.pack(["x = 1"], tokenizer, seq_len=1)


def test_read_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "two"}) + "\n\n" + json.dumps({"body": "x", "text": "three"}))
    assert data.read_text_files([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["first document\n", "two", "three"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert data.read_text_files([tmp_path / "c.jsonl"], text_field="body") == ["x"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "data file not found"),
        ("empty.txt", "  \n", "data file is empty"),
        ("bad.jsonl", '{"text": "ok"}\n{not json\n', r"bad.jsonl:2: invalid JSON"),
        ("field.jsonl", '{"content": "ok"}\n', "expected an object with a string field 'text'"),
        ("blank.jsonl", '{"text": "  "}\n', "holds no non-empty 'text' texts"),
        ("binary.txt", b"\xff\xfe\x00abc", "is not UTF-8 text"),
    ],
)
def test_read_files_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        data.read_text_files([path])


def test_folder_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        data.read_text_files([tmp_path])


def test_hub_dataset_without_datasets_package_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="needs the optional 'datasets' package"):
        data.load_hub_dataset("wikitext", "train")


def test_check_seq_len():
    data.check_seq_len(256, 256)
    with pytest.raises(DataError, match="above the model's max_position_embeddings=256"):
        data.check_seq_len(257, 256)

"""Text corpora (padkd.data.text): readers of the on-disk formats, the token cache, document split, packing."""

from __future__ import annotations

import json
import pickle
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from padkd.batch import stack_collate
from padkd.config import DataConfig
from padkd.data import DATASETS, DataSplits
from padkd.data import text as text_mod
from padkd.data.text import ByteTokenizer, PackedText, load_tokenizer, tokenizer_identity
from padkd.errors import PadkdError
from padkd.validate import check_component

DOCS = ["alpha beta gamma\n", "delta", "épsilon ζ", "eta theta iota kappa lambda mu", "nu", "xi omicron pi",
        "rho sigma", "tau upsilon phi chi psi omega"]
EOS, PAD = 256, 257


def write_txt(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return folder


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def load(root: Path, tmp_path: Path, **options: Any) -> DataSplits:
    return DATASETS.create("text", {"root": str(root), "cache_dir": str(tmp_path / "cache"), **options}, "data")


def one_line(err: pytest.ExceptionInfo[PadkdError], *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def stream(docs: list[str], ids: np.ndarray) -> list[int]:
    """The byte-tokenised stream of documents `ids` (corpus order), each followed by EOS: written out here."""
    out: list[int] = []
    for i in ids:
        out += list(docs[i].encode("utf-8")) + [EOS]
    return out


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    assert len(tok) == 258 and (tok.eos_token_id, tok.pad_token_id) == (EOS, PAD)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.decode([97, 0xC3, 0xA9, EOS, PAD]) == "aé"
    assert tok.decode([0xC3]) == "\ufffd"


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer saved with save_pretrained (built here, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(DOCS * 4, trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>").save_pretrained(str(folder))
    return folder


def test_load_tokenizer_from_a_local_directory(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(hf_tokenizer_dir)
    assert tok.eos_token_id == 0 and len(tok) > 256
    assert tokenizer_identity(tok) == tokenizer_identity(load_tokenizer(str(hf_tokenizer_dir)))
    assert tokenizer_identity(tok) != tokenizer_identity(ByteTokenizer())
    assert tokenizer_identity(ByteTokenizer()) == tokenizer_identity(ByteTokenizer())
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    splits = load(write_txt(tmp_path / "c", DOCS), tmp_path, tokenizer=str(hf_tokenizer_dir), block_size=8)
    assert splits.tokenizer.eos_token_id == 0 and splits.num_classes == len(tok)
    expected: list[int] = []
    for i in splits.train.documents:
        expected += tok(DOCS[i], add_special_tokens=False)["input_ids"] + [0]
    got = torch.cat([splits.train[i][0]["input_ids"][splits.train[i][0]["attention_mask"].bool()]
                     for i in range(len(splits.train))])
    assert got.tolist() == expected
    # no PAD token: the tail pads with EOS, masked and never a label
    assert splits.train.pad_id == 0


def test_load_tokenizer_errors(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    with pytest.raises(PadkdError) as err:
        load_tokenizer(tmp_path / "nowhere")
    one_line(err, "data.tokenizer", "is not a directory", "save_pretrained")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PadkdError) as err:
        load_tokenizer(tmp_path / "empty")
    one_line(err, "holds no loadable tokenizer")
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    no_eos.eos_token = None
    no_eos.save_pretrained(str(tmp_path / "no_eos"))
    with pytest.raises(PadkdError) as err:
        load_tokenizer(tmp_path / "no_eos")
    one_line(err, "has no EOS token", "add_special_tokens")


# ---------------------------------------------------------------- packing and splitting


def test_txt_folder_packs_documents_with_eos_and_pads_the_last_block(tmp_path: Path) -> None:
    splits = load(write_txt(tmp_path / "c", DOCS), tmp_path, block_size=16, val_fraction=0.25, test_fraction=0.25)
    assert splits.num_classes == 258 and splits.in_channels == 0 and isinstance(splits.tokenizer, ByteTokenizer)
    for ds in (splits.train, splits.val, splits.test):
        want = stream(DOCS, ds.documents)
        assert ds.n_tokens == len(want)
        assert ds.n_bytes == sum(len(DOCS[i].encode("utf-8")) for i in ds.documents)
        assert len(ds) == -(-len(want) // 16)
        for b in range(len(ds)):
            inputs, labels, index = ds[b]
            chunk = want[16 * b:16 * (b + 1)]
            n = len(chunk)
            assert index == b and inputs["input_ids"].dtype == torch.long and inputs["input_ids"].shape == (16,)
            assert inputs["input_ids"][:n].tolist() == chunk and inputs["input_ids"][n:].tolist() == [PAD] * (16 - n)
            assert inputs["attention_mask"].tolist() == [1] * n + [0] * (16 - n)
            assert labels.tolist() == chunk + [-100] * (16 - n)


def test_split_is_by_document_disjoint_covering_and_seeded(tmp_path: Path) -> None:
    root = write_txt(tmp_path / "c", DOCS)
    a = load(root, tmp_path, val_fraction=0.25, test_fraction=0.25)
    parts = [set(a.train.documents.tolist()), set(a.val.documents.tolist()), set(a.test.documents.tolist())]
    assert [len(p) for p in parts] == [4, 2, 2]
    assert set.union(*parts) == set(range(8)) and sum(len(p) for p in parts) == 8
    same = load(root, tmp_path, val_fraction=0.25, test_fraction=0.25, split_seed=0)
    assert np.array_equal(same.test.documents, a.test.documents)
    others = [load(root, tmp_path, val_fraction=0.25, test_fraction=0.25, split_seed=s).test.documents
              for s in (1, 2, 3)]
    assert any(not np.array_equal(o, a.test.documents) for o in others)
    assert load(root, tmp_path, val_fraction=0.0).val is None


def test_dataloader_batches_through_stack_collate(tmp_path: Path) -> None:
    splits = load(write_txt(tmp_path / "c", DOCS), tmp_path, block_size=8)
    batch = stack_collate([splits.train[i] for i in (0, 1, 2)])
    assert batch.inputs["input_ids"].shape == (3, 8) and batch.inputs["attention_mask"].shape == (3, 8)
    assert batch.targets.shape == (3, 8) and batch.index.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- formats


def test_jsonl_one_document_per_line_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": d}) for d in DOCS[:4]) + "\n\n" +
                    "\n".join(json.dumps({"body": d}) for d in DOCS[4:]) + "\n", encoding="utf-8")
    splits = load(path, tmp_path, text_field="body", block_size=32)
    assert splits.train.store.n_documents == 8
    assert splits.test.n_tokens == len(stream(DOCS, splits.test.documents))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", DOCS[:5])
    write_jsonl(folder / "b.jsonl", DOCS[5:])
    both = load(folder, tmp_path, block_size=32)
    assert both.train.store.n_documents == 8 and both.train.fingerprint["tokens_sha256"] == \
        splits.train.fingerprint["tokens_sha256"]


@pytest.mark.parametrize(("line", "fragment"), [
    ("{not json", "corpus.jsonl:3: not a JSON object"),
    ('["a list"]', "corpus.jsonl:3: no 'text' field"),
    ('{"txt": "x"}', "corpus.jsonl:3: no 'text' field"),
    ('{"text": 5}', "corpus.jsonl:3: 'text' is a int, not a string"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n" + line + "\n")
    with pytest.raises(PadkdError) as err:
        load(path, tmp_path)
    one_line(err, fragment)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written left in the cache


def test_format_detection_errors(tmp_path: Path) -> None:
    mixed = write_txt(tmp_path / "mixed", DOCS)
    write_jsonl(mixed / "x.jsonl", DOCS)
    with pytest.raises(PadkdError) as err:
        load(mixed, tmp_path)
    one_line(err, "both .txt and .jsonl", "data.format")
    assert load(mixed, tmp_path, format="txt").train.store.n_documents == 8
    write_txt(mixed / ".git", ["hidden folders are skipped"])
    (mixed / ".notes.txt").write_text("and so are hidden files")
    assert load(mixed, tmp_path, format="txt").train.store.n_documents == 8
    (tmp_path / "empty").mkdir()
    with pytest.raises(PadkdError) as err:
        load(tmp_path / "empty", tmp_path)
    one_line(err, "holds no .txt or .jsonl file")
    with pytest.raises(PadkdError) as err:
        load(tmp_path / "missing", tmp_path)
    one_line(err, "does not exist")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(PadkdError) as err:
        load(tmp_path / "notes.md", tmp_path)
    one_line(err, "not .jsonl")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"ok")
    (bad / "b.txt").write_bytes(b"caf\xe9")
    with pytest.raises(PadkdError) as err:
        load(bad, tmp_path)
    one_line(err, "b.txt", "not UTF-8", "0xe9")


def test_too_few_documents_and_bad_options(tmp_path: Path) -> None:
    root = write_txt(tmp_path / "c", DOCS[:2])
    with pytest.raises(PadkdError) as err:
        load(root, tmp_path)
    one_line(err, "has 2 documents, too few")
    with pytest.raises(PadkdError) as err:
        load(write_txt(tmp_path / "one", ["x", ""]), tmp_path)
    one_line(err, "1 non-empty document")
    with pytest.raises(PadkdError) as err:
        load(root, tmp_path, block_size=1)
    one_line(err, "data.block_size")
    with pytest.raises(PadkdError) as err:
        load(root, tmp_path, val_fraction=0.5, test_fraction=0.5)
    one_line(err, "val_fraction")


@pytest.mark.parametrize(("options", "fragment"), [
    ({"name": "text", "root": "x", "format": "xml"}, "data.format"),
    ({"name": "text", "root": "x", "block_sise": 8}, "did you mean 'block_size'"),
    ({"name": "text"}, "data.root: required option is missing"),
    ({"name": "python_stdlib", "source": "tests"}, "data.source"),
    ({"name": "python_stdlib", "block_size": "big"}, "data.block_size"),
])
def test_config_validation_of_the_options(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PadkdError) as err:
        check_component(DATASETS, DataConfig(**options), "data")
    one_line(err, fragment)


def test_hf_directory_without_datasets_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if it were not installed
    with pytest.raises(PadkdError) as err:
        load(folder, tmp_path)
    one_line(err, "HF datasets directory", "pip install datasets", ".jsonl")


def test_hf_save_to_disk_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS, "n": list(range(8))})}).save_to_disk(
        str(folder))
    splits = load(folder, tmp_path, block_size=16)
    assert splits.train.store.n_documents == 8
    assert splits.train.n_tokens == len(stream(DOCS, splits.train.documents))
    with pytest.raises(PadkdError) as err:
        load(folder, tmp_path, hf_split="validation")
    one_line(err, "no split 'validation'")


def test_python_stdlib_docs_and_code(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    docs = DATASETS.create("python_stdlib", {"source": "docs", "cache_dir": str(tmp_path)}, "data")
    texts = [topics[k] for k in sorted(topics) if topics[k]]
    assert docs.train.store.n_documents == len(texts)
    n_bytes = sum(ds.n_bytes for ds in (docs.train, docs.val, docs.test))
    assert n_bytes == sum(len(t.encode("utf-8")) for t in texts)
    code = DATASETS.create("python_stdlib", {"source": "code", "cache_dir": str(tmp_path)}, "data")
    modules = [p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size]
    assert code.train.store.n_documents == len(modules)
    both = DATASETS.create("python_stdlib", {"source": "both", "cache_dir": str(tmp_path)}, "data")
    assert both.train.store.n_tokens == code.train.store.n_tokens + docs.train.store.n_tokens


# ---------------------------------------------------------------- the token cache


def test_token_file_is_cached_and_keyed_by_content_and_tokenizer(tmp_path: Path, hf_tokenizer_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_txt(tmp_path / "c", DOCS)
    first = load(root, tmp_path)
    assert first.train.store.dtype == np.uint16
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == \
        ["documents.npy", "meta.json", "tokens.bin"]

    def fail(*args: Any) -> None:
        raise AssertionError("tokenised again")

    with monkeypatch.context() as m:
        m.setattr(text_mod, "_encode", fail)
        again = load(root, tmp_path)
    assert again.train.store.folder == first.train.store.folder
    (root / "doc01.txt").write_text("changed text", encoding="utf-8")
    changed = load(root, tmp_path)
    assert changed.train.store.folder != first.train.store.folder
    load(root, tmp_path, tokenizer=str(hf_tokenizer_dir))
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_tokenising_in_small_batches_writes_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = text_mod.txt_corpus(write_txt(tmp_path / "c", DOCS))
    whole = text_mod.tokenize(corpus, ByteTokenizer(), tmp_path / "one")
    monkeypatch.setattr(text_mod, "_BATCH_CHARS", 10)  # a batch flushed after every document or two
    calls: list[int] = []
    real = text_mod._encode
    monkeypatch.setattr(text_mod, "_encode", lambda tok, texts: calls.append(len(texts)) or real(tok, texts))
    batched = text_mod.tokenize(corpus, ByteTokenizer(), tmp_path / "many")
    assert len(calls) >= 4 and max(calls) <= 2
    assert (batched.folder / "tokens.bin").read_bytes() == (whole.folder / "tokens.bin").read_bytes()
    assert np.array_equal(batched.offsets, whole.offsets) and np.array_equal(batched.doc_bytes, whole.doc_bytes)


def test_large_vocabulary_is_stored_as_int32(tmp_path: Path) -> None:
    class Wide(ByteTokenizer):
        eos_token_id = 70_000
        pad_token_id = 70_001
        vocab_size = 70_002

    corpus = text_mod.txt_corpus(write_txt(tmp_path / "c", DOCS[:3]))
    store = text_mod.tokenize(corpus, Wide(), tmp_path / "cache")
    assert store.dtype == np.int32
    assert store.tokens[store.offsets[1] - 1] == 70_000  # EOS after the first document, beyond uint16


def test_truncated_token_file_is_refused(tmp_path: Path) -> None:
    root = write_txt(tmp_path / "c", DOCS)
    folder = load(root, tmp_path).train.store.folder
    data = (folder / "tokens.bin").read_bytes()
    (folder / "tokens.bin").write_bytes(data[:-2])
    with pytest.raises(PadkdError) as err:
        load(root, tmp_path)
    one_line(err, "tokens.bin holds", "truncated", "delete the folder")


def test_a_concurrent_writer_that_finished_first_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = text_mod.txt_corpus(write_txt(tmp_path / "c", DOCS))
    real = text_mod._write_tokens

    def racing(folder: Path, *args: Any) -> None:
        monkeypatch.setattr(text_mod, "_write_tokens", real)
        text_mod.tokenize(corpus, ByteTokenizer(), tmp_path / "cache")  # the other process wins the rename
        real(folder, *args)

    monkeypatch.setattr(text_mod, "_write_tokens", racing)
    store = text_mod.tokenize(corpus, ByteTokenizer(), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [store.folder.name]  # temporary folder removed
    assert store.n_documents == 8


def test_reader_memory_maps_and_never_holds_the_token_file(tmp_path: Path) -> None:
    big = [f"document {i} " + "x" * 2000 for i in range(40)]
    splits = load(write_txt(tmp_path / "c", big), tmp_path, block_size=64)
    ds = splits.train
    assert isinstance(ds.store.tokens, np.memmap) and ds.store.tokens.mode == "r"
    for obj in (ds, ds.store):  # only per-document tables, no array as long as the token file
        for name, value in vars(obj).items():
            if isinstance(value, np.ndarray) and not isinstance(value, np.memmap):
                assert value.size <= 2 * len(big) + 1, name
    payload = pickle.dumps(ds)  # what a spawned DataLoader worker receives: the path, not the tokens
    assert len(payload) < ds.n_tokens // 4
    clone = pickle.loads(payload)
    assert clone.store._tokens is None
    for i in (0, 5, len(ds) - 1):
        assert torch.equal(clone[i][0]["input_ids"], ds[i][0]["input_ids"])


def test_fingerprint_changes_with_the_split_and_block_size(tmp_path: Path) -> None:
    root = write_txt(tmp_path / "c", DOCS)
    a = load(root, tmp_path, block_size=8)
    assert a.train.fingerprint == load(root, tmp_path, block_size=8).train.fingerprint
    assert a.train.fingerprint != a.test.fingerprint
    assert a.train.fingerprint != load(root, tmp_path, block_size=16).train.fingerprint
    assert isinstance(a.train, PackedText)


def test_python_stdlib_subpackages_never_enter_installed_packages_or_test_suites() -> None:
    files_ = [entry[0] for entry in text_mod.stdlib_corpus("code", subpackages=True).key["files"]]
    assert "json/decoder.py" in files_ and "os.py" in files_
    assert not [f for f in files_ if {"site-packages", "test", "__pycache__"} & set(f.split("/")[:-1])]

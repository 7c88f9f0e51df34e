"""Text corpora for causal language modelling: tokenised once into a memory-mapped token file, split by
document, packed into fixed-length blocks (docs/data.md, "Text corpora").

A corpus is a folder of `.txt` files (one document per file), JSONL with a `text` field (one document per
line), an HF `datasets` `save_to_disk` directory (when `datasets` is installed), or CPython's own standard
library (`python_stdlib`). Every document is followed by the tokenizer's EOS token; the documents of a split
are concatenated in corpus order and cut into blocks of `block_size` tokens, as HF's `run_clm` groups texts,
except that the last partial block is kept and padded (attention_mask 0, labels -100) instead of dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from padkd import files
from padkd.data import DATASETS, DataSplits
from padkd.errors import PadkdError

#: Version of the token-cache layout; a new layout gets new cache folders, never reads an old one.
TOKENS_FORMAT = "padkd-tokens-1"
#: Label of positions that take no loss (padding), the HF convention.
IGNORE_INDEX = -100
#: Caps on what is read back from a token cache's metadata, and on one tokenizer call's batch of text.
_META_LIMIT = 1 << 20
_BATCH_CHARS = 1 << 20
#: Folders of the standard library that are not its modules: installed packages, caches, test suites.
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


class ByteTokenizer:
    """The default tokenizer, needing no files: ids 0–255 are the bytes of the UTF-8 text, 256 is EOS (ends
    every document), 257 is PAD (fills the last block; never a label). Vocabulary size 258."""

    eos_token_id = 256
    pad_token_id = 257
    vocab_size = 258

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as ids (no specials added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of byte ids; specials are dropped and a split UTF-8 sequence becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def load_tokenizer(path: str | Path | None) -> Any:
    """`ByteTokenizer()` for None, else `transformers.AutoTokenizer` from a local directory (never a download,
    never remote code). The tokenizer must have an EOS token (it separates the packed documents)."""
    if path is None:
        return ByteTokenizer()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PadkdError(f"data.tokenizer: '{folder}' is not a directory; point it at a folder written by "
                         "tokenizer.save_pretrained(), or leave it unset for the byte-level tokenizer")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PadkdError(f"data.tokenizer: '{folder}' holds no loadable tokenizer ({type(err).__name__}: {err}); "
                         "save one there with tokenizer.save_pretrained()") from None
    if tok.eos_token_id is None:
        raise PadkdError(f"data.tokenizer: the tokenizer in '{folder}' has no EOS token, which separates the packed "
                         "documents; add one (tokenizer.add_special_tokens({'eos_token': ...})) and save it again")
    return tok


def tokenizer_identity(tok: Any) -> str:
    """A sha256 naming what the tokenizer maps text to (class, vocabulary and rules, specials): equal for two
    copies of one tokenizer, different when any id could differ. Keys the token cache and the teacher cache."""
    h = hashlib.sha256()
    h.update(f"{type(tok).__module__}.{type(tok).__qualname__}\0".encode())
    if isinstance(tok, ByteTokenizer):
        h.update(f"bytes eos={tok.eos_token_id} pad={tok.pad_token_id}".encode())
        return h.hexdigest()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode("utf-8"))
    specials = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.bos_token_id, "n": len(tok)}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def special_ids(tok: Any) -> tuple[int, int]:
    """(EOS id, PAD id) of a tokenizer; a tokenizer without a PAD token pads with EOS (padding is masked)."""
    eos = int(tok.eos_token_id)
    return eos, int(tok.pad_token_id) if tok.pad_token_id is not None else eos


def _encode(tok: Any, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, without special tokens."""
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray(x, dtype=np.int64) for x in ids]


# ---------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """Documents to tokenise: `key` names their content (formats, files with sizes and modification times,
    options) for the token cache; `documents()` yields their texts in a fixed order."""

    name: str
    key: dict[str, Any]
    documents: Callable[[], Iterator[str]]


def _stat_key(root: Path, paths: list[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def _read_document(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PadkdError(f"{path}: cannot be read ({err.strerror}); check its permissions") from None
    return files.decode(data, path, "text document")


def _visible(root: Path, pattern: str) -> list[Path]:
    """Files matching `pattern` under `root`, recursively, sorted; hidden files and folders (`.git`) skipped."""
    return sorted(p for p in root.rglob(pattern)
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def txt_corpus(root: Path) -> Corpus:
    """Every `*.txt` file under `root` (recursively, sorted by path, hidden ones skipped), one document each."""
    paths = _visible(root, "*.txt")
    if not paths:
        raise PadkdError(f"data.root: '{root}' holds no .txt file; put one document per .txt file there")

    def documents() -> Iterator[str]:
        for p in paths:
            yield _read_document(p)

    return Corpus(str(root), {"format": "txt", "files": _stat_key(root, paths)}, documents)


def jsonl_corpus(root: Path, text_field: str) -> Corpus:
    """One document per line of a `.jsonl` file (or of every `*.jsonl` under a folder, sorted): the line's
    `text_field` string. Blank lines are skipped; any other bad line stops with `file:line`."""
    paths = [root] if root.is_file() else _visible(root, "*.jsonl")
    if not paths:
        raise PadkdError(f"data.root: '{root}' holds no .jsonl file")
    base = root.parent if root.is_file() else root

    def documents() -> Iterator[str]:
        for p in paths:
            with open(p, "rb") as f:
                for number, raw in enumerate(f, 1):
                    if raw.strip():
                        yield _jsonl_text(p, number, raw, text_field)

    return Corpus(str(root), {"format": "jsonl", "field": text_field, "files": _stat_key(base, paths)}, documents)


def _jsonl_text(path: Path, number: int, raw: bytes, field: str) -> str:
    where = f"{path}:{number}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise PadkdError(f"{where}: not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8") from None
    except ValueError as err:
        raise PadkdError(f"{where}: not a JSON object ({err}); write one JSON object per line") from None
    if not isinstance(record, dict) or field not in record:
        raise PadkdError(f"{where}: no '{field}' field; give each line a '{field}' string or set data.text_field")
    if not isinstance(record[field], str):
        raise PadkdError(f"{where}: '{field}' is a {type(record[field]).__name__}, not a string; store the "
                         "document's text there")
    return record[field]


def _is_hf_dir(root: Path) -> bool:
    return root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file())


def hf_corpus(root: Path, text_field: str, split: str) -> Corpus:
    """The `text_field` column of an HF `datasets` directory written by `save_to_disk` (its `split` when
    it holds a DatasetDict), one document per row."""
    try:
        import datasets
    except ImportError:
        raise PadkdError(f"data.root: '{root}' is an HF datasets directory (save_to_disk), but the 'datasets' "
                         "package is not installed; pip install datasets, or export the data as .jsonl") from None
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    try:
        loaded = datasets.load_from_disk(str(root))
    except (OSError, ValueError) as err:
        raise PadkdError(f"data.root: '{root}' cannot be loaded by datasets.load_from_disk ({type(err).__name__}: "
                         f"{err}); write it again with save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise PadkdError(f"data.hf_split: '{root}' has no split '{split}'; it has {', '.join(sorted(loaded))}")
        loaded = loaded[split]
    if text_field not in loaded.column_names:
        raise PadkdError(f"data.text_field: '{root}' has no column '{text_field}'; its columns are "
                         f"{', '.join(loaded.column_names)}")
    table = loaded.select_columns([text_field]).with_format(None)  # plain Python strings, whatever was saved

    def documents() -> Iterator[str]:
        for start in range(0, len(table), 1000):
            for offset, text in enumerate(table[start:start + 1000][text_field]):
                if not isinstance(text, str):
                    raise PadkdError(f"{root}: row {start + offset} of '{text_field}' is not a string")
                yield text

    key = {"format": "hf", "field": text_field, "split": split, "files": _stat_key(root, paths)}
    return Corpus(str(root), key, documents)


def detect_format(root: Path) -> Literal["txt", "jsonl", "hf"]:
    """The format of `root`: a `.jsonl` file, an HF save_to_disk folder, or a folder of .jsonl or of .txt files."""
    if root.is_file():
        if root.suffix == ".jsonl":
            return "jsonl"
        raise PadkdError(f"data.root: '{root}' is a file but not .jsonl; point data.root at a .jsonl file or at a "
                         "folder of .txt files")
    if _is_hf_dir(root):
        return "hf"
    has_jsonl, has_txt = bool(_visible(root, "*.jsonl")), bool(_visible(root, "*.txt"))
    if has_jsonl and has_txt:
        raise PadkdError(f"data.root: '{root}' holds both .txt and .jsonl files; set data.format to txt or jsonl")
    if has_jsonl:
        return "jsonl"
    if has_txt:
        return "txt"
    raise PadkdError(f"data.root: '{root}' holds no .txt or .jsonl file and is no HF save_to_disk directory; point "
                     "it at your corpus")


def stdlib_corpus(source: Literal["code", "docs", "both"], subpackages: bool) -> Corpus:
    """CPython's standard library: its `.py` modules (top level, or also its packages, test suites and
    installed packages excluded), sorted by path, and/or the topics of `pydoc_data.topics` (sorted by name)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths: list[Path] = []
    if source in ("code", "both"):
        if subpackages:
            for folder, subfolders, names in os.walk(root):
                subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP]  # never walk site-packages
                paths += [Path(folder) / n for n in names if n.endswith(".py")]
        else:
            paths = list(root.glob("*.py"))
        paths = sorted(p for p in paths if p.is_file())
    topics: dict[str, str] = {}
    if source in ("docs", "both"):
        from pydoc_data.topics import topics

    def documents() -> Iterator[str]:
        for p in paths:
            yield _read_document(p)
        for name in sorted(topics):
            yield topics[name]

    topics_sha = hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest()
    key = {"format": "python_stdlib", "python": sys.version, "files": _stat_key(root, paths), "topics": topics_sha}
    return Corpus(f"the Python {sys.version.split()[0]} standard library", key, documents)


# ---------------------------------------------------------------- the token file


def default_cache_dir() -> Path:
    """Where token files go unless `cache_dir` says otherwise: `$PADKD_CACHE/tokens`, else
    `$XDG_CACHE_HOME/padkd/tokens`, else `~/.cache/padkd/tokens`."""
    if os.environ.get("PADKD_CACHE"):
        return Path(os.environ["PADKD_CACHE"]).expanduser() / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "padkd" / "tokens"


class TokenFile:
    """A tokenised corpus on disk: `tokens.bin` (every document's ids then EOS, uint16 when the vocabulary
    fits, else int32), `documents.npy` (int64 `[n + 1]` token offsets, then `[n]` UTF-8 byte counts) and
    `meta.json`. Tokens are read through `np.memmap`, never loaded whole; pickling carries the path only."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        meta = files.read_json(folder / "meta.json", _META_LIMIT, "token cache metadata")
        if not isinstance(meta, dict) or meta.get("format") != TOKENS_FORMAT:
            raise PadkdError(f"token cache '{folder}' is not a {TOKENS_FORMAT} folder; delete it and run again")
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        self.n_tokens = int(meta["n_tokens"])
        size = (folder / "tokens.bin").stat().st_size if (folder / "tokens.bin").is_file() else -1
        if size != self.n_tokens * self.dtype.itemsize:
            raise PadkdError(f"token cache '{folder}': tokens.bin holds {size} bytes, its metadata says "
                             f"{self.n_tokens * self.dtype.itemsize} (truncated?); delete the folder and run again")
        table = np.load(folder / "documents.npy", allow_pickle=False)
        n = int(meta["n_documents"])
        if table.dtype != np.int64 or table.shape != (2 * n + 1,):
            raise PadkdError(f"token cache '{folder}': documents.npy does not match its metadata; delete the folder "
                             "and run again")
        self.offsets, self.doc_bytes = table[:n + 1], table[n + 1:]
        self._tokens: np.memmap | None = None

    @property
    def tokens(self) -> np.memmap:
        """The token ids, memory-mapped read-only (opened on first use, in each worker process)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.folder / "tokens.bin", dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return self._tokens

    @property
    def n_documents(self) -> int:
        return len(self.doc_bytes)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


def tokenize(corpus: Corpus, tok: Any, cache_dir: Path) -> TokenFile:
    """The corpus's token file in `cache_dir`, keyed by corpus and tokenizer identity: read if it exists,
    else written once, streaming (one batch of documents in memory), into a temporary folder renamed into
    place, so a reader never sees a partial file and two processes writing at once both end up reading one."""
    ident = tokenizer_identity(tok)
    key = hashlib.sha256(json.dumps([TOKENS_FORMAT, corpus.key, ident], sort_keys=True).encode()).hexdigest()[:32]
    final = cache_dir / key
    if (final / "meta.json").is_file():
        return TokenFile(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{os.getpid()}-", dir=cache_dir))
    try:
        _write_tokens(tmp, corpus, tok, ident)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent writer that finished first
                raise
        else:
            files.fsync_dir(cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return TokenFile(final)


def _write_tokens(folder: Path, corpus: Corpus, tok: Any, ident: str) -> None:
    vocab = len(tok)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)
    eos, _ = special_ids(tok)
    offsets, n_bytes = array("q", [0]), array("q")  # 8 bytes per document, not a Python int each
    digest = hashlib.sha256()
    with open(folder / "tokens.bin", "wb") as out:

        def flush(batch: list[str]) -> None:
            for text, ids in zip(batch, _encode(tok, batch), strict=True):
                if len(ids) and int(ids.max()) >= vocab:
                    raise PadkdError(f"{corpus.name}: the tokenizer produced id {int(ids.max())}, outside its "
                                     f"vocabulary of {vocab}; use a consistent tokenizer")
                data = np.append(ids.astype(dtype), dtype.type(eos)).tobytes()
                out.write(data)
                digest.update(data)
                offsets.append(offsets[-1] + len(ids) + 1)
                n_bytes.append(len(text.encode("utf-8")))

        batch: list[str] = []
        chars = 0
        for text in corpus.documents():
            if not text:
                continue  # an empty document holds no text to model
            batch.append(text)
            chars += len(text)
            if chars >= _BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
        out.flush()
        os.fsync(out.fileno())
    if len(n_bytes) < 2:
        raise PadkdError(f"data: {corpus.name} holds {len(n_bytes)} non-empty document(s); a split by document "
                         "needs at least two (train and test)")
    table = np.concatenate([np.frombuffer(offsets, dtype=np.int64), np.frombuffer(n_bytes, dtype=np.int64)])
    with open(folder / "documents.npy", "wb") as f:
        np.save(f, table, allow_pickle=False)
    meta = {"format": TOKENS_FORMAT, "dtype": dtype.name, "n_tokens": offsets[-1], "n_documents": len(n_bytes),
            "vocab_size": vocab, "eos": eos, "tokenizer": ident, "tokens_sha256": digest.hexdigest(),
            "documents_sha256": hashlib.sha256(table.tobytes()).hexdigest(), "corpus": corpus.key}
    files.atomic_write_text(folder / "meta.json", json.dumps(meta))


# ---------------------------------------------------------------- packed blocks


class PackedText(Dataset):
    """Blocks of `block_size` tokens cut from the concatenation of some documents of a token file (each ends
    with EOS). Item `i`: `({"input_ids", "attention_mask"}, labels, i)`, all LongTensor `[block_size]`; the
    last block's tail is PAD with mask 0 and label -100. Holds the per-document offsets only, no tokens."""

    def __init__(self, store: TokenFile, documents: np.ndarray, block_size: int, pad_id: int) -> None:
        self.store = store
        self.documents = np.asarray(documents, dtype=np.int64)
        self.block_size = block_size
        self.pad_id = pad_id
        self._starts = store.offsets[self.documents]
        lengths = store.offsets[self.documents + 1] - self._starts
        self._cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        #: Real tokens (EOS included) and the UTF-8 bytes of the text they cover (bits per byte).
        self.n_tokens = int(self._cum[-1])
        self.n_bytes = int(store.doc_bytes[self.documents].sum())

    def __len__(self) -> int:
        return -(-self.n_tokens // self.block_size)

    def block_tokens(self, i: int) -> np.ndarray:
        """The real tokens of block `i` (fewer than `block_size` in the last block), read from the memmap."""
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range 0..{len(self) - 1}")
        start, end = i * self.block_size, min((i + 1) * self.block_size, self.n_tokens)
        first = int(np.searchsorted(self._cum, start, side="right")) - 1
        last = int(np.searchsorted(self._cum, end, side="left"))
        tokens = self.store.tokens
        pieces = []
        for d in range(first, last):
            lo, hi = max(start, self._cum[d]) - self._cum[d], min(end, self._cum[d + 1]) - self._cum[d]
            pieces.append(tokens[self._starts[d] + lo:self._starts[d] + hi])
        return np.concatenate(pieces)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor, int]:
        real = torch.from_numpy(self.block_tokens(i).astype(np.int64))
        n = len(real)
        ids = torch.full((self.block_size,), self.pad_id, dtype=torch.long)
        ids[:n] = real
        mask = torch.zeros(self.block_size, dtype=torch.long)
        mask[:n] = 1
        labels = ids.clone()
        labels[n:] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask}, labels, i

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What fixes every item: the token file's content, the split's documents and the block layout
        (`padkd.lmcache.dataset_identity` hashes it)."""
        return {"tokens_sha256": self.store.meta["tokens_sha256"],
                "documents_sha256": self.store.meta["documents_sha256"],
                "split": hashlib.sha256(self.documents.tobytes()).hexdigest(),
                "block_size": self.block_size, "pad_id": self.pad_id, "n_blocks": len(self)}


def document_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Sorted train/val/test document ids: a permutation fixed by `seed` gives its first round(val_fraction·n)
    documents (at least one when the fraction is positive) to val, the next ones to test."""
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise PadkdError(f"data: val_fraction {val_fraction} must be in [0, 1) and test_fraction {test_fraction} in "
                         "(0, 1), leaving documents for training")
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n))
    if n_val + n_test >= n:
        raise PadkdError(f"data: the corpus has {n} documents, too few for {n_val} validation and {n_test} test "
                         "documents and a training split; add documents or lower val_fraction/test_fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    val, test, train = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    return np.sort(train), np.sort(val), np.sort(test)


def text_splits(corpus: Corpus, tokenizer: str | None, block_size: int, val_fraction: float, test_fraction: float,
                split_seed: int, cache_dir: str | None) -> DataSplits:
    """Tokenise (or read the cached tokens of) `corpus`, split it by document and pack each split."""
    if not 2 <= block_size <= 1 << 20:
        raise PadkdError(f"data.block_size must be in 2..{1 << 20} tokens, got {block_size}")
    tok = load_tokenizer(tokenizer)
    store = tokenize(corpus, tok, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    train, val, test = document_split(store.n_documents, val_fraction, test_fraction, split_seed)
    _, pad = special_ids(tok)

    def pack(docs: np.ndarray) -> PackedText:
        return PackedText(store, docs, block_size, pad)

    return DataSplits(train=pack(train), val=pack(val) if len(val) else None, test=pack(test), in_channels=0,
                      num_classes=len(tok), tokenizer=tok)


@DATASETS.register("text")
def text(root: str, format: Literal["auto", "txt", "jsonl", "hf"] = "auto", text_field: str = "text",
         hf_split: str = "train", tokenizer: str | None = None, block_size: int = 256, val_fraction: float = 0.1,
         test_fraction: float = 0.1, split_seed: int = 0, cache_dir: str | None = None) -> DataSplits:
    """A text corpus (.txt folder, .jsonl, HF save_to_disk) packed into blocks of `block_size` tokens.

    `tokenizer`: a local AutoTokenizer folder, or null for the byte-level tokenizer; documents are split
    into train/val/test by `val_fraction`/`test_fraction` (fixed by `split_seed`); the token file is cached
    in `cache_dir` (default: the user cache folder, see docs/data.md)."""
    base = Path(root).expanduser()
    if not base.exists():
        raise PadkdError(f"data.root: '{base}' does not exist; point it at a folder of .txt files, a .jsonl file or "
                         "an HF save_to_disk directory")
    kind = detect_format(base) if format == "auto" else format
    if kind != "jsonl" and not base.is_dir():
        raise PadkdError(f"data.root: '{base}' must be a folder for format {kind}")
    corpus = {"txt": lambda: txt_corpus(base), "jsonl": lambda: jsonl_corpus(base, text_field),
              "hf": lambda: hf_corpus(base, text_field, hf_split)}[kind]()
    return text_splits(corpus, tokenizer, block_size, val_fraction, test_fraction, split_seed, cache_dir)


@DATASETS.register("python_stdlib")
def python_stdlib(source: Literal["code", "docs", "both"] = "code", subpackages: bool = False,
                  tokenizer: str | None = None, block_size: int = 256, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, split_seed: int = 0, cache_dir: str | None = None) -> DataSplits:
    """CPython's own standard library as text, no download: its .py modules and/or pydoc_data's topics.

    `source`: code (the top-level modules; `subpackages: true` adds its packages), docs (the English
    pydoc topics) or both; one document per file or topic, split and packed as `text`."""
    return text_splits(stdlib_corpus(source, subpackages), tokenizer, block_size, val_fraction, test_fraction,
                       split_seed, cache_dir)

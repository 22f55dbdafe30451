"""Text for causal language models: a folder of text files (or one file), split by document, tokenized once into
memory-mapped token files, served as windows of ``context + 1`` tokens.

The default corpus is one every machine with Python has and nobody here wrote: the Python standard library's own
source files, without its tests and without installed packages (about 12 MB with Python 3.11). It changes between
Python versions, so the version and a digest of the corpus go into every run's results.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import platform
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from lightning_rigl.data.base import DataModule, default_download_dir
from lightning_rigl.errors import ConfigError

SPLITS = ("train", "val", "test")
SPLIT_RULES = ("documents", "contiguous")  # see split_of and contiguous_splits
BYTE = "byte"
# A single file is cut into documents of about this many bytes (at line ends), so that it can be split too.
FILE_PIECE_BYTES = 1 << 16
READ_BYTES = 1 << 16  # files are checked, digested and (at byte level) tokenized in reads of at most this
# Folders of the standard library that hold its tests, and of installed packages.
_NOT_THE_STDLIB = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_CACHE_VERSION = 2  # of the token files' layout: a change here rebuilds every cache (2: documents separated)


@dataclass(frozen=True)
class Document:
    """A piece of the corpus: its name (a path relative to the corpus root, and a piece number for one file), the
    file that holds it and its byte range there, and whether a document ends with it (not so for a piece of a
    file cut for its size, nor for the part of a document before a contiguous split's cut). Its bytes are read
    when needed, one document at a time, so that a corpus larger than memory can be digested and tokenized."""

    name: str
    path: Path
    start: int
    end: int
    ends_document: bool = True

    @property
    def size(self) -> int:
        """Its length in bytes."""
        return self.end - self.start

    def read(self) -> bytes:
        with self.path.open("rb") as file:
            file.seek(self.start)
            return file.read(self.size)

    def chunks(self) -> Iterator[bytes]:
        """Its bytes in pieces of at most ``READ_BYTES``."""
        with self.path.open("rb") as file:
            file.seek(self.start)
            left = self.size
            while left and (chunk := file.read(min(left, READ_BYTES))):
                left -= len(chunk)
                yield chunk


def stdlib_root() -> Path:
    """The folder of this Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[Document]:
    """The standard library's ``.py`` files, sorted by path, without tests and installed packages."""
    root = stdlib_root()
    paths = sorted(path for path in root.rglob("*.py")
                   if not _NOT_THE_STDLIB.intersection(path.relative_to(root).parts[:-1])
                   and not path.name.startswith("test_"))
    return [Document(path.relative_to(root).as_posix(), path, 0, path.stat().st_size) for path in paths]


def folder_documents(path: Path, any_bytes: bool = False) -> tuple[list[Document], list[str]]:
    """The text files under ``path`` (a folder, read recursively and sorted by path; or one file, cut into pieces
    of about ``FILE_PIECE_BYTES`` at line ends), and the names of the files skipped as not text (not UTF-8, or
    holding a NUL byte). With ``any_bytes``, one file is taken whatever its bytes (byte-level tokens need no text:
    enwik8 ends inside a character).

    Raises:
        ConfigError: ``path`` does not exist.
    """
    if not path.exists():
        raise ConfigError(f"data.text_dir {str(path)!r} does not exist: give a folder of text files or one text file.")
    if path.is_file():
        files = [path]
        root = path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                            for part in p.relative_to(path).parts))
        root = path
    documents, skipped = [], []
    for file in files:
        name = file.relative_to(root).as_posix()
        if not (any_bytes and path.is_file()) and not _is_text(file):
            skipped.append(name)
        elif path.is_file():
            documents.extend(Document(f"{name}#{index}", file, start, end, ends_document=False)
                             for index, (start, end) in enumerate(_pieces(file)))
        elif size := file.stat().st_size:
            documents.append(Document(name, file, 0, size))
    return documents, skipped


def _is_text(path: Path) -> bool:
    """Whether the file is UTF-8 without a NUL byte (read in pieces, never whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as file:
            while chunk := file.read(READ_BYTES):
                if b"\0" in chunk:
                    return False
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _pieces(path: Path) -> Iterator[tuple[int, int]]:
    """Byte ranges of ``path`` of at least ``FILE_PIECE_BYTES`` each, ending just after a line end (the last at the
    end of the file), found without reading the file whole."""
    size = path.stat().st_size
    with path.open("rb") as file:
        start = 0
        while start < size:
            file.seek(min(start + FILE_PIECE_BYTES, size))
            while (line := file.readline(1 << 20)) and not line.endswith(b"\n"):
                pass  # a line longer than the read: go on to its end
            end = file.tell()
            yield start, end
            start = end


def contiguous_splits(documents: Sequence[Document], val_fraction: float, test_fraction: float,
                      at_spaces: bool) -> dict[str, list[Document]]:
    """The documents, read as one text in order, cut in three: the first 1 - ``val_fraction`` - ``test_fraction``
    of the bytes to train, the next ``val_fraction`` to validate, the last ``test_fraction`` to test (enwik8's and
    text8's 90M/5M/5M). Each held-out share is rounded to a whole byte; a cut falls at that byte, or, with
    ``at_spaces``, just after the first ASCII space, tab or line end at or after it, so that it splits no character
    or word (at a document's end without one)."""
    total = sum(doc.size for doc in documents)
    test, val = round(total * test_fraction), round(total * val_fraction)
    cuts = [total - test - val, total - test]
    if at_spaces:
        cuts = [_after_space(documents, cut) for cut in cuts]
    bounds = {"train": (0, cuts[0]), "val": (cuts[0], cuts[1]), "test": (cuts[1], total)}
    splits: dict[str, list[Document]] = {split: [] for split in SPLITS}
    offset = 0
    for doc in documents:
        for split, (low, high) in bounds.items():
            start, end = max(low, offset), min(high, offset + doc.size)
            if start < end:
                ends_document = doc.ends_document and end == offset + doc.size
                splits[split].append(Document(doc.name, doc.path, doc.start + start - offset,
                                              doc.start + end - offset, ends_document))
        offset += doc.size
    return splits


_SPACE = re.compile(rb"[ \t\r\n]")


def _after_space(documents: Sequence[Document], cut: int) -> int:
    """The offset just after the first ASCII space, tab or line end at or after ``cut`` in the documents read as
    one text (no byte of a multi-byte UTF-8 character is one), or the end of the document that holds ``cut`` when
    none follows it there."""
    offset = 0
    for doc in documents:
        if offset + doc.size > cut:
            position = cut
            with doc.path.open("rb") as file:
                file.seek(doc.start + cut - offset)
                while position < offset + doc.size:
                    chunk = file.read(min(READ_BYTES, offset + doc.size - position))
                    if found := _SPACE.search(chunk):
                        return position + found.start() + 1
                    position += len(chunk)
            return position
        offset += doc.size
    return cut


def split_of(name: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split ("train", "val" or "test") of the document ``name``: a hash of the seed and the name alone, so
    that a document keeps its split whatever else the corpus holds or in which order it is read."""
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") / 2**64
    if draw < test_fraction:
        return "test"
    return "val" if draw < test_fraction + val_fraction else "train"


class Tokenizer:
    """Documents to token ids: "byte" (each byte its own token, a vocabulary of 256, no separator) or a Hugging
    Face tokenizer by name or folder (the ``transformers`` extra, the tokenizer already in the local cache), which
    ends each document with its end-of-sequence token where it has one (GPT-2's ``<|endoftext|>``), as GPT-2's
    training data does.

    Raises:
        ConfigError: the tokenizer cannot be loaded.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tokenizer = None
        self.separator: list[int] = []
        if name == BYTE:
            self.vocab_size = 256
            return
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(f"data.tokenizer={name!r} needs the transformers package (pip install "
                              "'lightning-rigl[transformers]'); data.tokenizer=byte needs nothing.") from None
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:  # ValueError: a folder that holds no tokenizer
            raise ConfigError(f"could not load the tokenizer {name!r} ({str(error).splitlines()[0]}). Name one in "
                              "the local Hugging Face cache or a folder that holds one, or use "
                              "data.tokenizer=byte.") from None
        self.vocab_size = len(self._tokenizer)
        if self._tokenizer.eos_token_id is not None:
            self.separator = [self._tokenizer.eos_token_id]
        else:
            rank_zero_warn(f"TextDataModule: the tokenizer {name!r} has no end-of-sequence token: documents follow "
                           "one another without a separator.")

    @property
    def byte_level(self) -> bool:
        return self._tokenizer is None

    @cached_property
    def fingerprint(self) -> str:
        """What the tokens depend on, whatever the tokenizer's name: "byte", or a digest of the tokenizer's
        definition (a fast tokenizer's JSON, else its vocabulary) and its separator."""
        if self._tokenizer is None:
            return BYTE
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else json.dumps(self._tokenizer.get_vocab(),
                                                                             sort_keys=True)
        return hashlib.sha256(json.dumps([definition, self.separator]).encode()).hexdigest()

    def encode(self, document: Document) -> Iterator[np.ndarray]:
        """The document's token ids, in pieces (at byte level one per read of ``READ_BYTES``: a document is never
        held whole), with the separator where a document ends."""
        if self._tokenizer is None:
            for chunk in document.chunks():
                yield np.frombuffer(chunk, dtype=np.uint8)
            return
        ids = self._tokenizer(document.read().decode("utf-8"), add_special_tokens=False)["input_ids"]
        yield np.asarray(ids + (self.separator if document.ends_document else []), dtype=np.int64)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned type that holds every id."""
        return np.dtype(np.uint8 if self.vocab_size <= 256 else np.uint16 if self.vocab_size <= 65536 else np.uint32)


class TokenWindows(Dataset):
    """Consecutive windows of a token file: item ``i`` is (tokens ``[i·c, i·c + c)``, the same shifted by one),
    ``c`` the context; the last window ends where the tokens do (a remainder shorter than a window is left out).
    The file is memory-mapped where it is read: a loader worker maps it again rather than receive a copy."""

    def __init__(self, path: Path, dtype: np.dtype, context: int) -> None:
        self.path, self.dtype, self.context = path, dtype, context
        self.size = path.stat().st_size // dtype.itemsize
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r") if self.size else np.zeros(0, self.dtype)
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return max(0, (self.size - 1) // self.context)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.context
        window = torch.from_numpy(self.tokens[start:start + self.context + 1].astype(np.int64))
        return window[:-1], window[1:]


class TextDataModule(DataModule):
    """A causal language model's data: the documents of a corpus split by a seeded hash of their names (or the
    corpus cut in three in order) into train/validation/test, each split's documents tokenized and concatenated
    once into a memory-mapped file (cached under ``cache_dir`` by a digest of the corpus, the tokenizer and the
    split), served as windows of ``context`` input tokens and their next tokens. The training order is a function
    of the run's seed and the epoch, and its position goes into checkpoints (exact resume), as for the image data
    modules.

    Args:
        text_dir: a folder of text files (read recursively; hidden files and files that are not UTF-8 text are
            skipped, with a warning), or one text file (cut into pieces of about 64 KiB at line ends, so that it
            can be split by document; at byte level taken whatever its bytes); None: the Python standard
            library's source (see the module's docstring).
        tokenizer: "byte" (a vocabulary of 256, nothing to download) or a Hugging Face tokenizer's name or folder.
        context: tokens a window gives the model, >= 1.
        batch_size: windows per batch and per process, >= 1.
        val_fraction, test_fraction: the shares held out, each in [0, 1), together < 1: of the documents (the
            expected share, ``split="documents"``) or of the bytes (``split="contiguous"``).
        seed: seeds the split by document.
        split: "documents": each document to a split by a seeded hash of its name (``split_of``); "contiguous": the
            corpus read in order and cut in three, train first and test last (``contiguous_splits``: enwik8's and
            text8's published split).
        cache_dir: where the token files go; None: ``~/.cache/lightning_rigl/text``.
        num_workers: loader worker processes per process.

    Attributes:
        vocab_size: the tokenizer's vocabulary, which the model's output layer must match (known at construction).
        corpus (after ``prepare_data`` and ``setup``): what the run read: the source, the Python version for the
            default corpus, the digest, files and bytes, tokens per split and bytes per token (for bits per byte).

    Raises:
        ConfigError: a setting out of range or a tokenizer that cannot be loaded (here); a missing, empty or
            non-text ``text_dir``, or a split held out (or trained on) without a single window (at
            ``prepare_data``/``setup``, before training); a checkpoint of another corpus or split (at resume).
    """

    def __init__(self, text_dir: str | None = None, tokenizer: str = BYTE, context: int = 256, batch_size: int = 32,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0, split: str = "documents",
                 cache_dir: str | None = None, num_workers: int = 0) -> None:
        super().__init__(text_dir, batch_size, num_workers)
        if split not in SPLIT_RULES:
            raise ConfigError(f"data.split must be one of {', '.join(SPLIT_RULES)} (by document, or the corpus cut in "
                              f"three in order), got {split!r}.")
        self.split = split
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ConfigError(f"data.context must be an integer >= 1 (tokens per window), got {context!r}.")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= fraction < 1:
                raise ConfigError(f"data.{name} must be in [0, 1), got {fraction!r}.")
        if val_fraction + test_fraction >= 1:
            raise ConfigError(f"data.val_fraction + data.test_fraction must be < 1 (the rest trains), got "
                              f"{val_fraction + test_fraction}.")
        self.context = context
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_download_dir() / "text"
        # Loaded here, not at setup: the model's output layer is built from vocab_size before any data is read.
        self.tokenizer = Tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.corpus: dict = {}
        self._cache_folder: Path | None = None

    def prepare_data(self) -> None:
        """Tokenize the corpus into the cache, unless it is there already (on one process per node)."""
        self._cached()

    def _cached(self) -> Path:
        """The cache folder of this corpus, tokenizer and split, built if missing; ``corpus`` filled in. The corpus
        is read (checked and digested) once a process: later calls return the same folder."""
        if self._cache_folder is None:
            self._cache_folder = self._build_cache()
        return self._cache_folder

    def _build_cache(self) -> Path:
        documents, source = self._documents()
        digest = _digest(documents)
        key = hashlib.sha256(json.dumps([_CACHE_VERSION, digest, self.tokenizer.fingerprint, self._split_settings()]
                                        ).encode()).hexdigest()[:16]
        folder = self.cache_root / key
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            tokenizer = self.tokenizer
            meta = {"vocab_size": tokenizer.vocab_size, "dtype": tokenizer.dtype.name, **source,
                    "digest": digest, "files": len({doc.name.split("#")[0] for doc in documents}),
                    "bytes": sum(doc.size for doc in documents), "split": self.split, "splits": {}}
            folder.mkdir(parents=True, exist_ok=True)
            rank_zero_info(f"TextDataModule: tokenizing {meta['bytes'] / 1e6:.1f} MB into {folder}")
            if self.split == "contiguous":
                by_split = contiguous_splits(documents, self.val_fraction, self.test_fraction,
                                             at_spaces=not tokenizer.byte_level)
            else:
                by_split = {split: [doc for doc in documents if split_of(
                    doc.name, self.seed, self.val_fraction, self.test_fraction) == split] for split in SPLITS}
            for split, chosen in by_split.items():
                partial = folder / f"{split}.bin.{os.getpid()}.partial"  # processes of a node may race here
                count = 0
                with partial.open("wb") as file:  # one document in memory at a time
                    for doc in chosen:
                        for tokens in tokenizer.encode(doc):
                            tokens.astype(tokenizer.dtype).tofile(file)
                            count += tokens.size
                partial.replace(folder / f"{split}.bin")
                size = sum(doc.size for doc in chosen)
                meta["splits"][split] = {"documents": len(chosen), "bytes": size, "tokens": count,
                                         "bytes_per_token": size / count if count else None}
            partial = folder / f"meta.json.{os.getpid()}.partial"
            partial.write_text(json.dumps(meta, indent=1))
            partial.replace(meta_path)
        self.corpus = json.loads(meta_path.read_text())
        self.vocab_size = self.corpus["vocab_size"]
        return folder

    def _documents(self) -> tuple[list[Document], dict]:
        if self.data_dir is None:
            return stdlib_documents(), {"source": "python-stdlib", "python": platform.python_version(),
                                        "path": str(stdlib_root())}
        documents, skipped = folder_documents(self.data_dir, any_bytes=self.tokenizer.byte_level)
        if skipped:
            rank_zero_warn(f"TextDataModule: skipped {len(skipped)} file(s) that are not UTF-8 text, e.g. "
                           f"{skipped[:3]}.")
        if not documents:
            raise ConfigError(f"data.text_dir {str(self.data_dir)!r} holds no text: no non-empty UTF-8 file"
                              f"{f' ({len(skipped)} other files skipped)' if skipped else ''}. Point it at a folder "
                              "of text files or at one text file.")
        return documents, {"source": str(self.data_dir)}

    @property
    def has_test_split(self) -> bool:
        return self.test_fraction > 0

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.has_test_split:
            self._windows(self._cached(), "test")  # refused before training rather than after it

    def _fit_sets(self) -> tuple[Dataset, Dataset | None]:
        folder = self._cached()
        train = self._windows(folder, "train")
        return train, (self._windows(folder, "val") if self.val_fraction > 0 else None)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must be resumed on: the corpus's digest, the tokenizer (its fingerprint: a tokenizer
        changed in place is another, the same one under another name is not) and the split."""
        return {"corpus": self._identity()} if self.corpus else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuses to resume training on another corpus, tokenizer or split than the checkpoint's (validating or
        testing a checkpoint on other text is fine).

        Raises:
            ConfigError: training resumes on data other than the checkpoint's.
        """
        saved = state_dict.get("corpus")
        if saved is None or self.trainer is None or self.trainer.state.fn != "fit" or saved == self._identity():
            return
        differs = ", ".join(f"{key} {saved.get(key)!r} then, {value!r} now" for key, value in self._identity().items()
                            if saved.get(key) != value)
        raise ConfigError(f"the checkpoint was trained on other data than this run's ({differs}): its training "
                          "order and windows would not continue. Resume with the same corpus (data.text_dir, or the "
                          "same Python for the default corpus), tokenizer and split settings, or start a new run.")

    def _identity(self) -> dict[str, Any]:
        return {"digest": self.corpus["digest"], "tokenizer": self.tokenizer.fingerprint, **self._split_settings()}

    def _split_settings(self) -> dict[str, Any]:
        """What decides which bytes go to which split (the seed only where documents are drawn)."""
        seed = {"seed": self.seed} if self.split == "documents" else {}
        return {"split": self.split, **seed, "val_fraction": self.val_fraction, "test_fraction": self.test_fraction}

    def _test_set(self) -> Dataset:
        return self._windows(self._cached(), "test")

    def _windows(self, folder: Path, split: str) -> TokenWindows:
        windows = TokenWindows(folder / f"{split}.bin", np.dtype(self.corpus["dtype"]), self.context)
        if len(windows) == 0:
            tokens = self.corpus["splits"][split]["tokens"]
            larger = "" if split == "train" else f", a larger data.{split}_fraction"
            none = "" if split == "train" else f", or data.{split}_fraction 0 for no {split} split" + (
                " (with --test_after_fit false)" if split == "test" else "")
            raise ConfigError(f"the {split} split holds {tokens} tokens, not one window of data.context="
                              f"{self.context} + 1: use a larger corpus{larger} or a smaller data.context{none}.")
        return windows


def _digest(documents: Sequence[Document]) -> str:
    """SHA-256 over every document's name and bytes, in order (read one at a time)."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.name.encode() + b"\0" + doc.size.to_bytes(8, "big"))
        for chunk in doc.chunks():
            digest.update(chunk)
    return digest.hexdigest()

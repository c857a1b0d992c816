"""Tokenizers and prepared corpora: ``sparsejax prepare`` and what reads its output.

``prepare([CORPUS, ...], out, tokenizer="bpe", vocab_size=8192)`` tokenizes text files
into ``out/``:

* ``train.bin``, ``val.bin``: the token ids, ``uint16`` (``uint32`` when the vocabulary
  exceeds 65,535), nanoGPT's flat layout;
* ``tokenizer.json``: the Hugging Face ``tokenizers`` file (byte-level BPE trained on the
  corpus, or the one given); none for ``bytes``;
* ``meta.json``: vocabulary size, dtype, tokenizer, token and byte counts per split, the
  sources (path, size, SHA-256) and the split rule.

Split rule: the last ``val_fraction`` of every source's bytes, from the first line start at
or after that point, is validation; the rest is training. With a BPE tokenizer each
source's part of a split ends with ``<|endoftext|>``. Sources are read in chunks (cut at
line ends), so a corpus larger than memory is streamed: BPE training reads an iterator and
tokens are appended to the ``.bin`` files as they come.

:class:`Tokenizer` encodes and decodes for both kinds and gives each token's length in
bytes (:meth:`Tokenizer.token_bytes`), which turns a validation loss into bits per byte
for subword tokens too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsejax.errors import ConfigError, PrepareError

__all__ = ["EOT", "META_FORMAT", "PrepareError", "Tokenizer", "char_level_split",
           "encode_text_file", "prepare",
           "read_meta", "token_dtype", "train_bpe"]

META_FORMAT = "sparsejax-tokens/1"
EOT = "<|endoftext|>"
OUTPUTS = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
CHUNK_BYTES = 1 << 22  # read sources 4 MiB at a time
PIECE_BYTES = 1 << 16  # encode in pieces of ~64 KiB (a batch for the Rust encoder)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` for vocabularies up to 65,535 tokens, else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


@dataclass
class Tokenizer:
    """Raw bytes (``hf`` None, 256 ids) or a Hugging Face ``tokenizers.Tokenizer``."""

    hf: Any = None

    @property
    def kind(self) -> str:
        return "bytes" if self.hf is None else "bpe"

    @property
    def vocab_size(self) -> int:
        return 256 if self.hf is None else self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        return None if self.hf is None else self.hf.token_to_id(EOT)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise PrepareError(f"{path}: not a tokenizers file "
                               f"({str(err).splitlines()[0]})") from None

    @classmethod
    def for_corpus(cls, directory: str | Path, meta: dict[str, Any] | None = None
                   ) -> Tokenizer:
        """The tokenizer of a prepared corpus directory (bytes when it has none);
        ``meta``: its ``meta.json`` when the caller has read it already."""
        meta = meta or read_meta(directory)
        if meta is None or meta["tokenizer"] == "bytes":
            return cls()
        return cls.from_file(Path(directory) / "tokenizer.json")

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids (int64) of ``text``."""
        if self.hf is None:
            raw = text.encode("utf-8") if isinstance(text, str) else text
            return np.frombuffer(raw, np.uint8).astype(np.int64)
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return np.asarray(self.hf.encode(text).ids, np.int64)

    def encode_pieces(self, pieces: list[str]) -> np.ndarray:
        """The concatenated ids of several texts (encoded in parallel)."""
        if self.hf is None:
            return self.encode("".join(pieces))
        ids = [e.ids for e in self.hf.encode_batch(pieces)]
        return np.fromiter((i for row in ids for i in row), np.int64,
                           sum(len(r) for r in ids))

    def decode(self, ids) -> str:
        """Text of ``ids``; byte sequences that are not UTF-8 become U+FFFD."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        if self.hf is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """``(vocab_size,)`` int32: how many bytes of text each token stands for (0 for
        special tokens such as ``<|endoftext|>``). Exact for raw bytes and byte-level BPE
        (each character of a byte-level token is one byte); for other tokenizers the UTF-8
        length of the token decoded alone."""
        if self.hf is None:
            return np.ones(256, np.int32)
        from tokenizers import decoders

        special = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        byte_level = isinstance(self.hf.decoder, decoders.ByteLevel)
        out = np.zeros(self.vocab_size, np.int32)
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i in special:
                continue
            out[i] = len(token) if byte_level else len(self.hf.decode([i]).encode("utf-8"))
        return out


# --------------------------------------------------------------------------- reading


def _chunks(path: Path, size: int = CHUNK_BYTES, start: int = 0, stop: int | None = None
            ) -> Iterator[tuple[int, bytes]]:
    """``(offset, bytes)``: bytes ``[start, stop)`` of ``path`` in pieces of about ``size``
    that end at line ends (where there is one), so no line is cut."""
    stop = path.stat().st_size if stop is None else stop
    with open(path, "rb") as f:
        f.seek(start)
        left, carry, offset = stop - start, b"", start
        while left > 0 or carry:
            block = f.read(min(size, left)) if left > 0 else b""
            left -= len(block)
            data = carry + block
            if left > 0:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no line end: cut before the last character's first byte
                    cut = len(data) - 1
                    while cut > 0 and data[cut] & 0xC0 == 0x80:
                        cut -= 1
                    cut = cut or len(data)
                data, carry = data[:cut], data[cut:]
            else:
                carry = b""
            if data:
                yield offset, data
                offset += len(data)


def _text(chunk: bytes, path: Path, offset: int) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PrepareError(f"{path}: not UTF-8 text at byte {offset + err.start} (use "
                           "--tokenizer bytes for binary data)") from None


def _split_point(path: Path, val_fraction: float) -> int:
    """Where validation starts: the first line start at or after ``(1 - f) * size``."""
    size = path.stat().st_size
    point = min(size - 1, int(math.floor(size * (1.0 - val_fraction))))
    with open(path, "rb") as f:
        f.seek(point)
        tail = f.read(1 << 16)
    newline = tail.find(b"\n")
    cut = point + newline + 1 if 0 <= newline < len(tail) - 1 else point
    return max(1, min(cut, size - 1))


def _pieces(chunk: str) -> list[str]:
    """A chunk in ~``PIECE_BYTES`` pieces cut after line ends (encoded in parallel)."""
    pieces, start = [], 0
    while start < len(chunk):
        end = chunk.find("\n", start + PIECE_BYTES)
        end = len(chunk) if end < 0 else end + 1
        pieces.append(chunk[start:end])
        start = end
    return pieces


# --------------------------------------------------------------------------- training


def train_bpe(sources: list[Path], vocab_size: int, progress: bool = False) -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenisation, no normaliser: lossless on any text)
    with ``vocab_size`` tokens, ``<|endoftext|>`` included, trained on ``sources`` read as
    a stream."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise PrepareError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 "
                           "tokens (256 bytes and <|endoftext|>)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)

    def texts() -> Iterator[str]:
        for path in sources:
            for offset, chunk in _chunks(path):
                yield from _pieces(_text(chunk, path, offset))

    hf.train_from_iterator(texts(), trainer=trainer)
    return Tokenizer(hf)


def encode_text_file(path: Path, tokenizer: Tokenizer, flag: str) -> tuple[np.ndarray, int]:
    """``(token ids, bytes)`` of a whole file as one sequence (raw bytes for the byte
    tokenizer, UTF-8 text otherwise); errors are one line naming ``flag`` and the file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{flag} {path}: {err.strerror or err}") from None
    if tokenizer.hf is None:
        return tokenizer.encode(raw), len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{flag} {path} is not UTF-8 text (byte {err.start}); the "
                           "tokenizer cannot encode it") from None
    return tokenizer.encode(text), len(raw)



# --------------------------------------------------------------------------- preparing


def read_meta(directory: str | Path) -> dict[str, Any] | None:
    """The ``meta.json`` of a prepared corpus directory, or None when there is none."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PrepareError(f"{path}: unreadable ({err})") from None
    missing = [k for k in ("vocab_size", "dtype", "tokenizer", "splits") if k not in meta]
    if missing:
        raise PrepareError(f"{path}: not a sparsejax prepared corpus (no {missing[0]})")
    return meta


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a directory")
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        what = "another preparation" if "meta.json" in present else f"{present[0]}"
        raise PrepareError(f"--out {out} already holds {what}; pass --overwrite to "
                           "replace it or choose another directory")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sources(sources: list[Path], val_fraction: float) -> None:
    if not sources:
        raise PrepareError("no corpus given")
    for path in sources:
        if not path.is_file():
            raise PrepareError(f"corpus not found: {path}")
        if path.stat().st_size < 2:
            raise PrepareError(f"corpus {path} is empty (needs at least a line of text)")
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction {val_fraction} must be in (0, 1)")


def _make_tokenizer(tokenizer: str, sources: list[Path], vocab_size: int, progress: bool
                    ) -> Tokenizer:
    """Raw bytes, a BPE trained on ``sources``, or a ``tokenizer.json`` file."""
    if tokenizer == "bytes":
        return Tokenizer()
    if tokenizer == "bpe":
        return train_bpe(sources, vocab_size, progress)
    if not Path(tokenizer).is_file():
        raise PrepareError(f"--tokenizer {tokenizer}: not bytes, bpe or a tokenizer.json file")
    return Tokenizer.from_file(tokenizer)


def _tokenize(sources: list[Path], tok: Tokenizer, dtype: np.dtype, val_fraction: float,
              files: dict[str, Any], bar: Any) -> dict[str, dict[str, int]]:
    """Write each source's train and validation parts, encoded, to ``files``; the token
    and byte counts per split."""
    counts = {split: {"tokens": 0, "bytes": 0} for split in ("train", "val")}
    for path in sources:
        cut = _split_point(path, val_fraction)
        for split, (start, stop) in (("train", (0, cut)), ("val", (cut, path.stat().st_size))):
            for offset, chunk in _chunks(path, start=start, stop=stop):
                text = _text(chunk, path, offset) if tok.hf is not None else chunk
                ids = (tok.encode_pieces(_pieces(text)) if tok.hf is not None
                       else tok.encode(text))
                files[split].write(ids.astype(dtype).tobytes())
                counts[split]["tokens"] += len(ids)
                counts[split]["bytes"] += len(chunk)
                bar.update(len(chunk))
            if tok.eot_id is not None:
                files[split].write(np.asarray([tok.eot_id], dtype).tobytes())
                counts[split]["tokens"] += 1
    return counts


def _meta(tok: Tokenizer, tokenizer: str, dtype: np.dtype, counts: dict[str, Any],
          sources: list[Path], val_fraction: float) -> dict[str, Any]:
    return {"format": META_FORMAT, "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "tokenizer": "bytes" if tok.hf is None else (
                "bpe" if tokenizer == "bpe" else str(tokenizer)),
            "eot_id": tok.eot_id, "splits": counts,
            "sources": [{"path": str(p), "bytes": p.stat().st_size, "sha256": _sha256(p)}
                        for p in sources],
            "split_rule": f"per source: the last {val_fraction} of its bytes, from the "
                          "first line start at or after that point, is validation"
                          + ("; each source's part of a split ends with <|endoftext|>"
                             if tok.eot_id is not None else "")}


def _publish(out: Path, temporary: dict[str, Path], tok: Tokenizer, meta: dict[str, Any]
             ) -> None:
    """Move the finished token files, tokenizer and meta into place."""
    for split, path in temporary.items():
        os.replace(path, out / f"{split}.bin")
    if tok.hf is not None:
        tok.hf.save(str(out / ".tokenizer.json.partial"))
        os.replace(out / ".tokenizer.json.partial", out / "tokenizer.json")
    elif (out / "tokenizer.json").exists():  # an overwritten BPE preparation
        (out / "tokenizer.json").unlink()
    (out / ".meta.json.partial").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(out / ".meta.json.partial", out / "meta.json")


def prepare(corpora: list[str | Path], out: str | Path, tokenizer: str = "bpe",
            vocab_size: int = 8192, val_fraction: float = 0.1, overwrite: bool = False,
            progress: bool | None = None) -> dict[str, Any]:
    """Tokenize ``corpora`` into ``out`` (see the module docstring); returns the meta.

    ``tokenizer``: ``bytes``, ``bpe`` (trained here with ``vocab_size`` tokens) or the path
    of a ``tokenizer.json``. Raises :class:`PrepareError` (one line) on bad input, before
    anything is written; the outputs appear together at the end (written to temporary
    files first)."""
    from tqdm import tqdm

    out = Path(out)
    sources = [Path(c) for c in corpora]
    _check_sources(sources, val_fraction)
    _check_output(out, overwrite)
    progress = sys.stderr.isatty() if progress is None else progress
    tok = _make_tokenizer(tokenizer, sources, vocab_size, progress)
    dtype = token_dtype(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    temporary = {split: out / f".{split}.bin.partial" for split in ("train", "val")}
    try:
        files = {split: open(path, "wb") for split, path in temporary.items()}
        try:
            counts = _tokenize(sources, tok, dtype, val_fraction, files, bar)
        finally:
            for f in files.values():
                f.close()
        meta = _meta(tok, tokenizer, dtype, counts, sources, val_fraction)
        _publish(out, temporary, tok, meta)
    finally:
        bar.close()
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return meta


def char_level_split(text_file: str | Path, out: str | Path) -> int:
    """nanoGPT's ``shakespeare_char/prepare.py``: the file's distinct characters, sorted,
    become ids ``0..V-1``; the first 90 % of the characters are ``train.bin``, the rest
    ``val.bin`` (uint16, the bare token layout ``data.source=tokens`` reads with
    ``model.vocab_size=V``); ``chars.json`` lists the characters. Returns ``V``."""
    text = Path(text_file).read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = {c: i for i, c in enumerate(chars)}
    data = np.array([ids[c] for c in text], np.uint16)
    cut = int(len(data) * 0.9)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data[:cut].tofile(out / "train.bin")
    data[cut:].tofile(out / "val.bin")
    (out / "chars.json").write_text(json.dumps({"vocab_size": len(chars), "chars": chars},
                                               ensure_ascii=False) + "\n")
    return len(chars)

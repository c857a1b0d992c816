"""``sparsejax prepare`` and prepared corpora: BPE round trip on the corpus, the dtype
switch, meta.json against the config, bits per byte, streaming, and bad input as one line
with exit code 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sparsejax import corpus
from sparsejax.cli import main
from sparsejax.config import ConfigError, load_config
from sparsejax.corpus import Tokenizer, prepare, token_dtype
from sparsejax.data import load_token_data
from sparsejax.tasks import LanguageModelTask, lm_eval_metrics
from tests.conftest import TINY_GPT

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "bpe"
    prepare([SHAKESPEARE], out, tokenizer="bpe", vocab_size=512, progress=False)
    return out


def split_ids(directory: Path, split: str) -> np.ndarray:
    meta = json.loads((directory / "meta.json").read_text())
    return np.fromfile(directory / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)


def test_bpe_round_trips_the_whole_corpus(bpe_dir):
    tok = Tokenizer.for_corpus(bpe_dir)
    eot = tok.eot_id
    train, val = split_ids(bpe_dir, "train"), split_ids(bpe_dir, "val")
    assert train[-1] == eot and val[-1] == eot and eot not in train[:-1]
    text = tok.decode(train[:-1]) + tok.decode(val[:-1])
    assert text == SHAKESPEARE.read_text()
    assert tok.vocab_size == 512 and train.max() < 512


def test_meta_counts_tokens_and_bytes_of_each_split(bpe_dir):
    meta = json.loads((bpe_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == \
        SHAKESPEARE.stat().st_size
    for split in ("train", "val"):
        assert meta["splits"][split]["tokens"] == len(split_ids(bpe_dir, split))
    assert meta["sources"][0]["bytes"] == SHAKESPEARE.stat().st_size
    val_start = SHAKESPEARE.stat().st_size - meta["splits"]["val"]["bytes"]
    assert SHAKESPEARE.read_bytes()[val_start - 1:val_start] == b"\n"  # a line start


def test_token_bytes_add_up_to_each_splits_bytes(bpe_dir):
    table = Tokenizer.for_corpus(bpe_dir).token_bytes()
    meta = json.loads((bpe_dir / "meta.json").read_text())
    for split in ("train", "val"):
        assert table[split_ids(bpe_dir, split)].sum() == meta["splits"][split]["bytes"]


def test_bytes_tokenizer_round_trips_and_needs_no_tokenizer_file(tmp_path):
    meta = prepare([SHAKESPEARE], tmp_path / "b", tokenizer="bytes", progress=False)
    assert meta["vocab_size"] == 256 and not (tmp_path / "b" / "tokenizer.json").exists()
    raw = np.concatenate([split_ids(tmp_path / "b", s) for s in ("train", "val")])
    assert raw.astype(np.uint8).tobytes() == SHAKESPEARE.read_bytes()


def test_streamed_small_chunks_round_trip_text_without_line_ends(tmp_path, monkeypatch):
    text = ("naïve café — 東京 " * 400) + "\nend\n"  # multi-byte characters, one long line
    source = tmp_path / "long.txt"
    source.write_text(text)
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(corpus, "PIECE_BYTES", 100)
    prepare([source], tmp_path / "out", tokenizer="bpe", vocab_size=300, val_fraction=0.2,
            progress=False)
    tok = Tokenizer.for_corpus(tmp_path / "out")
    decoded = "".join(tok.decode(split_ids(tmp_path / "out", s)[:-1]) for s in ("train", "val"))
    assert decoded == text


@pytest.mark.parametrize("vocab,dtype", [(256, np.uint16), (65535, np.uint16),
                                         (65536, np.uint32), (100_000, np.uint32)])
def test_token_dtype_switches_at_65535(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)


def test_a_large_vocabulary_writes_uint32_tokens_the_loader_reads(bpe_dir, tmp_path):
    tok = Tokenizer.for_corpus(bpe_dir)
    tok.hf.add_tokens([f"<extra_{i}>" for i in range(70_000)])
    tok.hf.save(str(tmp_path / "big.json"))
    meta = prepare([SHAKESPEARE], tmp_path / "big", tokenizer=str(tmp_path / "big.json"),
                   progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 65535
    assert (tmp_path / "big" / "val.bin").stat().st_size == 4 * meta["splits"]["val"]["tokens"]
    cfg = load_config(None, [*TINY_GPT, "data.source=tokens",
                             f"data.path={tmp_path / 'big'}"])
    assert cfg.model.vocab_size == meta["vocab_size"]  # from meta.json
    data = load_token_data(cfg.data, 32, cfg.model.vocab_size)
    assert data.val.dtype == np.uint32 and len(data.val) == meta["splits"]["val"]["tokens"]


def test_vocabulary_comes_from_meta_and_a_smaller_one_is_refused(bpe_dir):
    base = [*TINY_GPT, "data.source=tokens", f"data.path={bpe_dir}"]
    assert load_config(None, base).model.vocab_size == 512
    assert load_config(None, [*base, "model.vocab_size=576"]).model.vocab_size == 576  # pad
    with pytest.raises(ConfigError, match=r"model.vocab_size.*300 is smaller than the "
                                          r"vocabulary of .*meta.json \(512\)"):
        load_config(None, [*base, "model.vocab_size=300"])


def test_a_bare_token_file_needs_a_stated_vocabulary(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "x.bin")
    with pytest.raises(ConfigError, match="model.vocab_size.*without meta.json"):
        load_config(None, [*TINY_GPT, "data.source=tokens", f"data.path={tmp_path / 'x.bin'}"])


def test_bits_per_byte_is_total_nats_over_total_bytes():
    sums = {"loss": 12.0, "count": 4.0, "bytes": 10.0}
    out = lm_eval_metrics(sums, ("loss", "bpb", "bits_per_token"))
    assert out["loss"] == 3.0
    assert out["bits_per_token"] == pytest.approx(3.0 / math.log(2))
    assert out["bpb"] == pytest.approx(12.0 / math.log(2) / 10.0)


def test_validation_bpb_of_a_uniform_model_on_subword_tokens(bpe_dir):
    cfg = load_config(None, [*TINY_GPT, "data.source=tokens", f"data.path={bpe_dir}"])
    task = LanguageModelTask(cfg)
    assert task.eval_metric_names == ("loss", "bpb", "bits_per_token")
    table = Tokenizer.for_corpus(bpe_dir).token_bytes()
    sums, tokens, text_bytes = {}, 0, 0
    for batch in task.eval_batches():
        uniform = lambda x: np.zeros((*x.shape, 512), np.float32)  # noqa: E731
        for k, v in task.eval_sums(uniform, batch).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        tokens += batch["y"].size
        text_bytes += int(table[batch["y"]].sum())
    out = task.finish_eval(sums)
    assert out["loss"] == pytest.approx(math.log(512), rel=1e-5)  # float32 sums
    assert out["bpb"] == pytest.approx(tokens * math.log2(512) / text_bytes, rel=1e-5)
    assert out["bpb"] < out["bits_per_token"]  # ~2.8 bytes per token


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(["prepare", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_with_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = run_cli([empty, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "is empty" in err and "\n" not in err
    code, err = run_cli([SHAKESPEARE, "--out", tmp_path / "o", "--vocab-size", "200"], capsys)
    assert code == 2 and "--vocab-size 200" in err and "at least 257" in err
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"ok\n\xff\xfe\x00 text\n" * 10)
    code, err = run_cli([binary, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not UTF-8 text at byte 3" in err
    code, err = run_cli([tmp_path / "missing.txt", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "corpus not found" in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_an_earlier_preparation_is_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prepare", str(SHAKESPEARE), "--out", str(out), "--tokenizer", "bytes"]) == 0
    before = (out / "train.bin").read_bytes()
    code, err = run_cli([SHAKESPEARE, "--out", out, "--vocab-size", "300"], capsys)
    assert code == 2 and "already holds another preparation" in err and "--overwrite" in err
    assert (out / "train.bin").read_bytes() == before
    assert main(["prepare", str(SHAKESPEARE), "--out", str(out), "--vocab-size", "300",
                 "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 300
    assert (out / "tokenizer.json").is_file() and not list(out.glob(".*partial"))


def test_the_committed_bpe_corpus_is_what_prepare_rebuilds(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's command, run from the repository root
    committed = REPO / "data" / "shakespeare_bpe"
    prepare(["data/tinyshakespeare.txt"], tmp_path / "again", vocab_size=2048, progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (committed / name).read_bytes(), name


def test_the_committed_character_split_is_what_char_level_split_rebuilds(tmp_path):
    from sparsejax.corpus import char_level_split

    assert char_level_split(REPO / "data" / "tinyshakespeare.txt", tmp_path) == 65
    committed = REPO / "data" / "shakespeare_char"
    for name in ("train.bin", "val.bin", "chars.json"):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
    train = np.fromfile(tmp_path / "train.bin", np.uint16)
    val = np.fromfile(tmp_path / "val.bin", np.uint16)
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()
    chars = sorted(set(text))
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    assert "".join(chars[i] for i in val[:40]) == text[len(train):len(train) + 40]

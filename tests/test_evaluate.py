"""``sparsejax evaluate``: the strided windows score every target at most once (exactly once
when windows overlap), the perplexity equals Hugging Face's fixed-length protocol run on
``transformers`` itself (and, without PyTorch, the golden logits ``transformers`` wrote),
and bad settings end in one line with exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax.errors import ConfigError
from sparsejax.evaluate import evaluate_ids, strided_windows
from sparsejax.runs import load_model
from sparsejax.train import run
from tests.conftest import REPO
from tests.test_hf import GOLDEN, needs_transformers
from tests.test_hf import transformers_module as transformers_module  # the fixture


@settings(max_examples=200, deadline=None, derandomize=True)
@given(n=st.integers(2, 300), block=st.integers(2, 64), data=st.data())
def test_windows_score_each_target_once_and_stay_within_the_block(n, block, data):
    stride = data.draw(st.integers(1, block))
    windows = strided_windows(n, block, stride)
    targets = [b + i for b, e, first in windows for i in range(first, e - b)]
    assert len(targets) == len(set(targets)) and 0 not in targets
    assert all(2 <= e - b <= block and first >= 1 for b, e, first in windows)
    if stride < block:  # overlapping windows: every target from 1 on, once
        assert sorted(targets) == list(range(1, n))
    else:  # the protocol's loop: each window's first token is context only
        assert sorted(targets) == [t for t in range(1, n) if t % block]


@pytest.mark.parametrize("stride", [0, -1, 33])
def test_a_stride_outside_1_to_the_block_is_refused(stride):
    with pytest.raises(ConfigError, match=f"--stride {stride} must be in"):
        strided_windows(100, 32, stride)


def test_the_nll_equals_the_golden_transformers_logits():
    reference = np.load(GOLDEN / "gpt2" / "reference.npz")
    ids, logits = reference["ids"][0], reference["logits"][0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                            keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    expected = -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))
    model, _, _ = load_model(GOLDEN / "gpt2")
    got = evaluate_ids(model, ids, block=len(ids), stride=len(ids))
    assert got["scored"] == len(ids) - 1
    assert got["nll"] == pytest.approx(expected, rel=1e-5)


@needs_transformers
@pytest.mark.parametrize("block, stride", [(32, 32), (32, 8), (64, 17)])
def test_the_perplexity_is_the_fixed_length_protocol_of_transformers(block, stride,
                                                                     transformers_module):
    import torch

    directory = GOLDEN / "llama_gqa"
    ids = np.random.default_rng(5).integers(0, 320, 150)
    reference = transformers_module.AutoModelForCausalLM.from_pretrained(directory).eval()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):  # the guide's loop, as it is written
        end = min(begin + block, len(ids))
        trg_len = end - prev_end
        input_ids = torch.as_tensor(ids[begin:end])[None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = reference(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum, n_tokens = nll_sum + float(loss) * valid, n_tokens + valid
        prev_end = end
        if end == len(ids):
            break
    model, _, _ = load_model(directory)
    got = evaluate_ids(model, ids, block, stride, batch_size=3)
    assert got["scored"] == n_tokens
    assert math.exp(got["nll"] / got["scored"]) == pytest.approx(
        math.exp(nll_sum / n_tokens), rel=1e-5)


def test_the_command_prints_and_writes_perplexity_and_bits_per_byte(tmp_path, tiny_gpt):
    cfg = tiny_gpt("train.steps=4")
    run(cfg, verbose=False)
    text = tmp_path / "held_out.txt"
    text.write_text("def evaluate(model, data):\n    return model(data)\n" * 20)
    out = tmp_path / "ppl.json"
    done = subprocess.run([sys.executable, "-m", "sparsejax", "evaluate", cfg.run_dir,
                           "--data", str(text), "--stride", "16", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["tokens"] == len(text.read_bytes()) == result["bytes"]
    assert result["scored"] == result["tokens"] - 1  # stride < block: every target once
    assert result["bits_per_byte"] == pytest.approx(
        math.log(result["perplexity"]) * result["scored"] / result["bytes"] / math.log(2))
    assert "perplexity" in done.stdout and "bits per byte" in done.stdout
    for bad in (["--stride", "64"], ["--stride", "0"], ["--block-size", "1000"]):
        refused = subprocess.run([sys.executable, "-m", "sparsejax", "evaluate", cfg.run_dir,
                                  "--data", str(text), *bad], capture_output=True, text=True,
                                 cwd=REPO)
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "Traceback" not in refused.stderr

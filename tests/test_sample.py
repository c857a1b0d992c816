"""KV-cached decoding: logits equal to the uncached forward (float32, 1e-5) for dense,
sparse, quantised and analog (converters on, noise off at inference) models in their
inference form; greedy tokens equal to the
uncached loop; the cache rebuilt when the block fills; ``sparsejax sample`` deterministic
under a seed, on byte-level and BPE runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.cli import main
from sparsejax.config import load_config
from sparsejax.corpus import prepare
from sparsejax.models import GPT
from sparsejax.nn import apply_rules
from sparsejax.sample import Decoder, sample, sample_token
from sparsejax.train import run
from tests.conftest import TINY_GPT
from tests.helpers.decoding import cached_logits
from tests.test_corpus import SHAKESPEARE

RULES = {
    "dense": [],
    "sste+dat": [{"path": r"blocks/\d+/mlp/(fc|proj)", "sparsity": {"method": "sste"},
                  "quant": {"weights": {"method": "dat", "bits": 4, "affine": False}}}],
    "maskllm": [{"path": r"blocks/\d+/mlp/fc", "sparsity": {"method": "maskllm"}}],
    "analog": [{"path": r"blocks/\d+/(mlp/fc|attn/proj)",
                "analog": {"method": "tile", "weight_noise": 0.05, "dac_bits": 8,
                           "adc_bits": 8}}],
}


def tiny_gpt(rules: list, block_size: int = 16, seed: int = 0) -> GPT:
    model = GPT(vocab_size=64, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                rngs=nnx.Rngs(params=seed))
    apply_rules(model, rules, total_steps=100)
    model.eval()
    return model


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("prefill", [1, 5, 16])
def test_cached_logits_equal_the_uncached_forward(name, prefill):
    model = tiny_gpt(RULES[name])
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    full = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(cached_logits(model, ids, prefill), full, atol=1e-5, rtol=1e-5)


def greedy_uncached(model: GPT, prompt: list[int], new: int) -> list[int]:
    """The reference: the whole context (right-padded to the block, which causal attention
    ignores) through the plain forward for every token."""
    forward = nnx.jit(lambda m, x: m(x))
    ids = list(prompt)
    for _ in range(new):
        context = ids[-model.block_size:]
        window = np.zeros((1, model.block_size), np.int32)
        window[0, :len(context)] = context
        ids.append(int(jnp.argmax(forward(model, window)[0, len(context) - 1])))
    return ids[len(prompt):]


def test_greedy_cached_decoding_equals_the_uncached_loop_within_the_block():
    model = tiny_gpt(RULES["sste+dat"])
    prompt = [3, 1, 4, 1, 5]
    expected = greedy_uncached(model, prompt, 11)  # exactly fills the block of 16
    got = Decoder(model, temperature=0.0).generate(np.asarray(prompt), 11, jax.random.key(0))
    assert got.tolist() == expected


def test_a_full_block_rebuilds_the_cache_from_the_last_half_block():
    model = tiny_gpt([])
    prompt = list(range(1, 17))  # a full block: the first new token needs a rebuild
    got = Decoder(model, temperature=0.0).generate(np.asarray(prompt), 20, jax.random.key(0))
    assert len(got) == 20
    # the token after the rebuild sees exactly the last 8 tokens of the context
    context = prompt + got[:1].tolist()
    assert int(got[1]) == greedy_uncached(tiny_gpt([]), context[-8:], 1)[0]


def test_top_k_and_temperature_restrict_the_draws():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
    draws = {int(sample_token(logits, jax.random.key(i), 1.0, 2)[0]) for i in range(200)}
    assert draws == {2, 3}
    assert int(sample_token(logits, jax.random.key(0), 0.0, 0)[0]) == 3


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    run(load_config(None, [*TINY_GPT, "train.steps=20", f"run_dir={root / 'r'}", "name=r"]),
        verbose=False)
    return root / "r"


def test_sampling_is_deterministic_under_a_seed(byte_run):
    a = sample(byte_run, "def ", 40, temperature=1.0, top_k=0, seed=3)
    b = sample(byte_run, "def ", 40, temperature=1.0, top_k=0, seed=3)
    c = sample(byte_run, "def ", 40, temperature=1.0, top_k=0, seed=4)
    assert a.text == b.text and a.text != c.text
    assert a.prompt == "def " and a.new_tokens == 40 and a.tokens_per_sec > 0


def test_a_prompt_longer_than_the_block_is_cut_from_the_left_once(byte_run):
    said = []
    result = sample(byte_run, "x" * 50 + "tail", 5, message=said.append)
    assert result.truncated and result.prompt_tokens == 32 and result.prompt.endswith("tail")
    assert len(said) == 1 and "cut to the last 32" in said[0]


def test_cli_sample_prints_the_text(byte_run, capsys):
    assert main(["sample", str(byte_run), "--prompt", "import ", "--max-new-tokens", "10",
                 "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("import ") and "tokens/s with a KV cache" in captured.err
    assert main(["sample", str(byte_run), "--max-new-tokens", "0"]) == 2


def test_a_bpe_run_samples_through_its_tokenizer(tmp_path):
    prepare([SHAKESPEARE], tmp_path / "bpe", vocab_size=300, progress=False)
    run(load_config(None, [*TINY_GPT, "train.steps=10", "data.source=tokens",
                           f"data.path={tmp_path / 'bpe'}", f"run_dir={tmp_path / 'r'}",
                           "name=r"]), verbose=False)
    result = sample(tmp_path / "r", "ROMEO:", 30, seed=0)
    assert result.prompt == "ROMEO:" and result.new_tokens == 30
    assert len(result.text) > 30  # BPE tokens stand for more than a byte on average


def test_packed_2_4_layers_decode_the_same_greedy_tokens():
    from sparsejax.nn import pack_model

    model = tiny_gpt([{"path": r"blocks/\d+/mlp/(fc|proj)", "sparsity": {"method": "sste"}}])
    prompt = np.asarray([5, 9, 2])
    dense = Decoder(model, temperature=0.0).generate(prompt, 8, jax.random.key(0))
    assert pack_model(model)  # the layers whose packed form is smaller
    packed = Decoder(model, temperature=0.0).generate(prompt, 8, jax.random.key(0))
    assert packed.tolist() == dense.tolist()

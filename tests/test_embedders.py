"""Embedders: MiniLM parity with sentence-transformers, the T5 mean-pooled encoder."""

import os

# transformers must not import TensorFlow (Keras 3 is installed) for the parity test.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_TORCH", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest
import seqio

import library_fixtures
from elm_jax.models import embedders
from elm_jax.models import t5

SENTENCES = [
    "The cat sat on the mat.",
    "A",
    "Answer Choices: yes, no, Instance: Is it common to see frost during some college "
    "commencements?",
    "Premise: James understands that Charles thinks that three children hold a boy's "
    "hand. Hypothesis: Charles thinks that three children hold a boy's hand.",
    "Tokenizers split unfamiliar words like antidisestablishmentarianism into pieces.",
    # Longer than 512 tokens, so both truncation lengths cut it.
    " ".join(f"word{i} and more" for i in range(400)),
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  return library_fixtures.minilm(str(minilm_dir))


@pytest.fixture(scope="module")
def reference(minilm_dir):
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  return sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.mark.parametrize("max_length", [256, 512])
def test_minilm_matches_sentence_transformers(minilm, reference, max_length):
  reference.max_seq_length = max_length
  expected = reference.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
  # The long sentence really is truncated at this length.
  assert len(minilm.tokenize(SENTENCES[-1:], max_length)[0]) == max_length
  actual = minilm.embed(SENTENCES, max_length=max_length)
  assert actual.dtype == np.float32
  assert actual.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_minilm_output_is_unit_norm(minilm):
  norms = np.linalg.norm(minilm.embed(SENTENCES[:4]), axis=1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_minilm_padding_does_not_change_embedding(minilm):
  alone = minilm.embed(SENTENCES[:1])
  with_long = minilm.embed([SENTENCES[0], SENTENCES[-1]])
  np.testing.assert_allclose(with_long[:1], alone, atol=1e-6)


def test_minilm_compiles_once_per_bucket(minilm):
  texts = [f"sentence number {i} " * (1 + i % 5) for i in range(40)]
  minilm.embed(texts[:20])
  before = minilm._forward._cache_size()  # pylint: disable=protected-access
  minilm.embed(texts[20:])
  assert minilm._forward._cache_size() == before  # pylint: disable=protected-access


def test_minilm_fingerprint_depends_on_max_length(minilm_dir, minilm):
  other = embedders.MiniLMEmbedder(minilm_dir, max_length=128)
  assert other.fingerprint != minilm.fingerprint
  assert embedders.MiniLMEmbedder(minilm_dir).fingerprint == minilm.fingerprint


def test_minilm_rejects_too_long_max_length(minilm):
  with pytest.raises(ValueError, match="exceeds"):
    minilm.embed(["x"], max_length=513)


def test_length_buckets():
  assert embedders.length_buckets(256) == (16, 32, 64, 128, 256)
  assert embedders.length_buckets(100) == (16, 32, 64, 100)


@pytest.fixture(scope="module")
def tiny_t5():
  vocabulary = seqio.ByteVocabulary()
  config = t5.T5Config(vocab_size=vocabulary.vocab_size, d_model=13, d_kv=5, d_ff=17,
                       num_heads=3, num_encoder_layers=2, num_decoder_layers=1,
                       dropout_rate=0.0)
  model = t5.T5(config)
  ids = np.ones((1, 8), np.int32)
  params = model.init(jax.random.PRNGKey(0), ids, ids)["params"]
  return model, params, vocabulary


def test_t5_mean_embedder_is_mean_of_encoder_outputs(tiny_t5):
  model, params, vocabulary = tiny_t5
  embedder = embedders.T5MeanEmbedder(model=model, params=params, vocabulary=vocabulary,
                                      max_length=40)
  texts = ["short", "a somewhat longer input text"]
  actual = embedder.embed(texts)
  assert actual.shape == (2, 13)
  for row, text in enumerate(texts):
    ids = np.asarray([list(vocabulary.encode(text)) + [vocabulary.eos_id]], np.int32)
    encoded = np.asarray(model.apply({"params": params}, ids, method="encode"))[0]
    expected = encoded.mean(axis=0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(actual[row], expected, atol=1e-5)


def test_t5_mean_embedder_truncates_and_fingerprints(tiny_t5):
  model, params, vocabulary = tiny_t5
  embedder = embedders.T5MeanEmbedder(model=model, params=params, vocabulary=vocabulary,
                                      max_length=12)
  ids = embedder.tokenize(["x" * 50], 12)[0]
  assert len(ids) == 12
  assert ids[-1] == vocabulary.eos_id
  other_params = jax.tree.map(lambda p: p + 1.0, params)
  other = embedders.T5MeanEmbedder(model=model, params=other_params, vocabulary=vocabulary,
                                   max_length=12)
  assert other.fingerprint != embedder.fingerprint


def test_hashing_embedder_is_normalized_and_lexical():
  embedder = embedders.HashingEmbedder(dim=31)
  vectors = embedder.embed(["red apple pie", "red apple pie", "blue ocean waves"])
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
  assert vectors[0] @ vectors[1] == pytest.approx(1.0, abs=1e-6)
  assert vectors[0] @ vectors[2] < 0.9

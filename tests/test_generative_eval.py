"""Tests of the generation metrics and the generative evaluation loop."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from elm_jax.data import vocab as vocab_lib
from elm_jax.evaluation import generative
from elm_jax.evaluation import metrics
from elm_jax.models import t5

# The example of the SARI metric card of Hugging Face `evaluate` (its published
# output: sari 26.9536..., keep 22.5274..., del 50.0, add 8.3333...).
CARD_SOURCE = "About 95 species are currently accepted."
CARD_PREDICTION = "About 95 you now get in."
CARD_REFERENCES = ["About 95 species are currently known.",
                   "About 95 species are now accepted.", "95 species are now accepted."]


def test_sari_matches_published_example():
  result = metrics.sari([CARD_SOURCE], [CARD_PREDICTION], [CARD_REFERENCES])
  assert result["sari"] == pytest.approx(26.953601953601954, abs=1e-9)
  assert result["keep"] == pytest.approx(22.527472527472526, abs=1e-9)
  assert result["del"] == pytest.approx(50.0, abs=1e-9)
  assert result["add"] == pytest.approx(8.333333333333332, abs=1e-9)


def test_sari_perfect_match_is_100():
  result = metrics.sari(["a b c ."], ["a b c ."], [["a b c ."]])
  assert result["sari"] == pytest.approx(100.0)


def test_sari_hand_computed_two_references():
  # Source "a b c", prediction "a b", references "a c" and "a b c" (k = 2).
  # Per order n = 1..4 (keep F1, delete precision, add F1):
  #   n=1: keep P=(2/2+1/2)/2=.75, R=3/5=.6, F1=2/3; del {c:2}-{c:2} -> 0; add 1.
  #   n=2: keep P=1/2, R=1/2, F1=.5; del {bc:2}-{bc:1} -> .5; add P=1, R=0/1 -> 0.
  #   n=3: keep P=1 (nothing kept), R=0/1, F1=0; del {abc:2}-{abc:1} -> .5; add 1.
  #   n=4: nothing at all -> 1, 1, 1.
  keep = (2 / 3 + 0.5 + 0 + 1) / 4
  delete = (0 + 0.5 + 0.5 + 1) / 4
  add = (1 + 0 + 1 + 1) / 4
  result = metrics.sari(["a b c"], ["a b"], [["a c", "a b c"]])
  assert result["keep"] == pytest.approx(100 * keep)
  assert result["del"] == pytest.approx(100 * delete)
  assert result["add"] == pytest.approx(100 * add)
  assert result["sari"] == pytest.approx(100 * (keep + delete + add) / 3)


def test_sari_corpus_is_mean_of_sentences():
  one = metrics.sari_sentence("a b c", "a b", ["a c", "a b c"])["sari"]
  two = metrics.sari_sentence(CARD_SOURCE, CARD_PREDICTION, CARD_REFERENCES)["sari"]
  corpus = metrics.sari(["a b c", CARD_SOURCE], ["a b", CARD_PREDICTION],
                        [["a c", "a b c"], CARD_REFERENCES])
  assert corpus["sari"] == pytest.approx((one + two) / 2)


def test_exact_match_normalizes():
  assert metrics.exact_match(["The Cat!", "dog", "x"], [["cat"], ["a dog", "dogs"], ["y"]]) \
      == pytest.approx(200 / 3)


def test_rouge_takes_best_reference():
  scores = metrics.rouge(["the cat sat"], [["a dog ran", "the cat sat"]])
  assert scores["rouge1"] == pytest.approx(100.0)
  assert scores["rougeL"] == pytest.approx(100.0)


def test_bleu_with_uneven_reference_counts():
  value = metrics.bleu(["the cat sat on the mat", "hello there general kenobi"],
                       [["the cat sat on the mat"], ["hello there general kenobi", "hi"]])
  assert value == pytest.approx(100.0)


def test_metric_argument_errors():
  with pytest.raises(ValueError, match="2 predictions but 1"):
    metrics.exact_match(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="unknown metric 'meteor'"):
    metrics.compute_metrics(["meteor"], predictions=["a"], references=[["a"]])
  with pytest.raises(ValueError, match="sources"):
    metrics.compute_metrics(["sari"], predictions=["a"], references=[["a"]])


def test_input_bucket():
  assert generative.input_bucket(3, 512) == 16
  assert generative.input_bucket(17, 512) == 32
  assert generative.input_bucket(600, 512) == 512


# ---------------------------------------------------------------------------
# The decoding loop on a tiny random model and a real seqio Task.

TASK = "test_generative_eval_tiny"
TEXTS = [("translate: the cat sat", "le chat"), ("a much longer input about a dog that "
                                                 "ran across the garden", "un chien"),
         ("short", "court")]


@pytest.fixture(scope="module")
def vocabulary():
  return vocab_lib.get_vocabulary()


@pytest.fixture(scope="module")
def tiny(vocabulary):
  config = t5.T5Config(vocab_size=vocab_lib.padded_vocab_size(vocabulary), d_model=24,
                       d_kv=5, d_ff=30, num_heads=3, num_encoder_layers=2,
                       num_decoder_layers=2, relative_attention_num_buckets=8,
                       relative_attention_max_distance=20, dropout_rate=0.0)
  tokens = np.ones((1, 4), np.int32)
  params = nn.unbox(t5.T5(config).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
  return config, params


@pytest.fixture(scope="module")
def task(vocabulary):
  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [i for i, _ in TEXTS], "targets": [t for _, t in TEXTS],
        "idx": np.arange(len(TEXTS), dtype=np.int32)})

  features = {"inputs": seqio.Feature(vocabulary, add_eos=True),
              "targets": seqio.Feature(vocabulary, add_eos=True)}
  if TASK in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(TASK)
  seqio.TaskRegistry.add(
      TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features=features, metric_fns=[])
  yield TASK
  seqio.TaskRegistry.remove(TASK)


def test_generative_task_records_and_metrics(task, tiny, vocabulary):
  config, params = tiny
  decoding_config = generative.DecodingConfig(max_decode_length=6)
  records, scores = generative.evaluate_generative_task(
      task, config=config, params=params, vocabulary=vocabulary, batch_size=2,
      decoding_config=decoding_config, metric_names=("exact_match", "rouge", "bleu", "sari"))
  assert [r["idx"] for r in records] == [0, 1, 2]
  assert [r["references"] for r in records] == [[t] for _, t in TEXTS]
  assert records[0]["source"] == TEXTS[0][0]
  assert all(isinstance(r["prediction"], str) for r in records)
  assert set(scores) == {"exact_match", "rouge1", "rouge2", "rougeL", "bleu", "sari",
                         "sari_keep", "sari_del", "sari_add"}

  # Predictions used as references score 100 exact match: the metrics see the
  # detokenized predictions exactly as recorded.
  echoed = [dict(r, references=[r["prediction"]]) for r in records]
  assert generative.score_records(echoed, ["exact_match"])["exact_match"] == 100.0


def test_padding_does_not_change_predictions(tiny, vocabulary):
  config, params = tiny
  decoding_config = generative.DecodingConfig(max_decode_length=6)
  examples = [{"inputs": vocabulary.encode(text) + [1], "targets_pretokenized": target,
               "idx": i} for i, (text, target) in enumerate(TEXTS)]
  together = generative.generate_examples(examples, config=config, params=params,
                                          vocabulary=vocabulary, batch_size=3,
                                          decoding_config=decoding_config)
  alone = generative.generate_examples(examples[2:], config=config, params=params,
                                       vocabulary=vocabulary, batch_size=1,
                                       decoding_config=decoding_config)
  assert together[2]["prediction"] == alone[0]["prediction"]


def test_beam_search_runs(tiny, vocabulary):
  config, params = tiny
  examples = [{"inputs": vocabulary.encode("hello world") + [1],
               "targets_pretokenized": "x", "idx": 0}]
  records = generative.generate_examples(
      examples, config=config, params=params, vocabulary=vocabulary, batch_size=1,
      decoding_config=generative.DecodingConfig(method="beam", num_beams=2,
                                                max_decode_length=5))
  assert len(records) == 1
  assert isinstance(records[0]["prediction"], str)

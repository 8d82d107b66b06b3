"""Tests of the span-corruption preprocessor and the held-in pretraining Task."""

import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from data_fixtures import linked_cache, small_vocab  # pylint: disable=unused-import
from elm_jax.data import fetch
from elm_jax.data import span_corruption as sc
from elm_jax.tasks import bigbench as bigbench_tasks

VOCAB_SIZE = 1000  # Sentinels are 999, 998, ...; documents use ids 3..899.


def _mask(length, seed):
  return sc.random_spans_noise_mask(tf.constant(length), tf.constant(seed, tf.int32)).numpy()


def _reconstruct(inputs, targets, vocab_size=VOCAB_SIZE):
  """Rebuilds the original tokens: each input sentinel takes its target span."""
  spans, current = {}, None
  for token in targets:
    if token >= vocab_size - 100:
      current = token
      spans[current] = []
    else:
      assert current is not None, "targets must start with a sentinel"
      spans[current].append(token)
  out = []
  for token in inputs:
    out.extend(spans.pop(token) if token >= vocab_size - 100 else [token])
  assert not spans, f"unused target spans {spans}"
  return out


@pytest.mark.parametrize("length", [2, 3, 17, 100, 284, 513])
def test_mask_noise_count(length):
  mask = _mask(length, [4, 2])
  assert mask.shape == (length,)
  assert mask.sum() == min(max(round(length * 0.15), 1), length - 1)
  assert not mask[0]


def test_mask_span_count():
  mask = _mask(284, [1, 5])
  starts = np.count_nonzero(mask[1:] & ~mask[:-1])
  assert starts == round(round(284 * 0.15) / 3)


def test_mask_deterministic_per_seed():
  np.testing.assert_array_equal(_mask(200, [7, 7]), _mask(200, [7, 7]))
  assert not np.array_equal(_mask(200, [7, 7]), _mask(200, [7, 8]))


@pytest.mark.parametrize("seed", [[0, 1], [3, 9], [12, 5]])
def test_corrupt_reconstructs(seed):
  tokens = np.arange(3, 3 + 131, dtype=np.int32)
  inputs, targets = sc.corrupt(tf.constant(tokens), tf.constant(seed, tf.int32), VOCAB_SIZE)
  assert _reconstruct(inputs.numpy().tolist(), targets.numpy().tolist()) == tokens.tolist()


def test_first_sentinel_is_last_id():
  inputs, targets = sc.corrupt(tf.range(3, 60), tf.constant([1, 2]), VOCAB_SIZE)
  assert targets.numpy()[0] == VOCAB_SIZE - 1
  assert VOCAB_SIZE - 1 in inputs.numpy()


@pytest.mark.parametrize("inputs_length", [64, 113, 256, 512])
def test_lengths_fill_inputs(inputs_length):
  tokens_length = sc.tokens_length_for(inputs_length)
  tokens = tf.range(3, 3 + tokens_length)
  inputs, targets = sc.corrupt(tokens, tf.constant([2, 2]), VOCAB_SIZE)
  assert inputs.shape[0] + 1 == inputs_length
  assert targets.shape[0] + 1 == sc.targets_length_for(inputs_length)


def test_known_lengths_match_t5():
  # T5's random_spans_helper gives 568 tokens and 114 targets for 512 inputs.
  assert sc.tokens_length_for(512) == 568
  assert sc.targets_length_for(512) == 114


def _documents():
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 900, size=n).astype(np.int32) for n in (50, 7, 300, 1, 120, 90)]
  return docs, tf.data.Dataset.from_generator(
      lambda: ({"targets": d} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)})


class _FakeVocab(seqio.PassThroughVocabulary):
  def __init__(self):
    super().__init__(size=VOCAB_SIZE - 100, eos_id=1)

  @property
  def extra_ids(self):
    return 100

  @property
  def vocab_size(self):
    return VOCAB_SIZE


def _corrupted(seed):
  docs, dataset = _documents()
  features = {"inputs": seqio.Feature(_FakeVocab()), "targets": seqio.Feature(_FakeVocab())}
  with seqio.utils.map_seed_manager(seed):
    out = sc.span_corruption(dataset, {"inputs": 64, "targets": 16}, features)
  return docs, list(out.as_numpy_iterator())


def test_preprocessor_keeps_every_token():
  docs, examples = _corrupted(11)
  rebuilt = []
  for ex in examples:
    rebuilt.extend(_reconstruct(ex["inputs"].tolist(), ex["targets"].tolist()))
  assert rebuilt == np.concatenate(docs).tolist()


def test_preprocessor_noise_share():
  _, examples = _corrupted(11)
  noise = sum(np.count_nonzero(ex["targets"] < VOCAB_SIZE - 100) for ex in examples)
  total = sum(len(_reconstruct(ex["inputs"].tolist(), ex["targets"].tolist()))
              for ex in examples)
  assert 0.13 <= noise / total <= 0.17


def test_preprocessor_deterministic_given_seed():
  _, first = _corrupted(11)
  _, again = _corrupted(11)
  _, other = _corrupted(12)
  assert [e["inputs"].tolist() for e in first] == [e["inputs"].tolist() for e in again]
  assert [e["inputs"].tolist() for e in first] != [e["inputs"].tolist() for e in other]


def test_preprocessor_rejects_vocab_without_sentinels():
  _, dataset = _documents()
  vocab = seqio.PassThroughVocabulary(size=100)
  features = {"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)}
  with pytest.raises(ValueError, match="sentinel"):
    sc.span_corruption(dataset, {"inputs": 64, "targets": 16}, features)


@pytest.fixture(name="fake_cache")
def fixture_fake_cache(tmp_path):
  folder = tmp_path / "bigbench"
  files = {}
  tasks = {"held": "Tell me about the weather in the city today", "strategyqa": "SECRET"}
  for name, text in tasks.items():
    path = folder / name / "task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": name, "examples": [
        {"input": f"{text} {i}", "target_scores": {"yes": 1, "no": 0}} for i in range(40)]}))
    files[f"{name}/task.json"] = fetch.sha256_file(path)
  (folder / fetch.MANIFEST).write_text(json.dumps({"files": files}))
  yield tmp_path
  bigbench_tasks.register()  # Restores the import-time registration.


def test_pretrain_task_yields_denoising_pairs(fake_cache, small_vocab):
  bigbench_tasks.register(fake_cache, vocabulary=small_vocab)
  task = seqio.get_mixture_or_task(bigbench_tasks.SPAN_CORRUPTION_TASK)
  examples = list(task.get_dataset({"inputs": 32, "targets": sc.targets_length_for(32)},
                                   split="train", shuffle=False, seed=1).as_numpy_iterator())
  assert examples
  sentinel_floor = small_vocab.vocab_size - 100
  text = ""
  for ex in examples:
    assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1
    assert len(ex["inputs"]) <= 32
    assert ex["targets"][0] == small_vocab.vocab_size - 1
    tokens = _reconstruct(ex["inputs"][:-1].tolist(), ex["targets"][:-1].tolist(),
                          small_vocab.vocab_size)
    assert max(tokens) < sentinel_floor
    text += small_vocab.decode(tokens)
  assert "weather" in text
  assert "SECRET" not in text  # strategyqa is an evaluation task.

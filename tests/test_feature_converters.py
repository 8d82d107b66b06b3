"""Tests of packed training batches and grouped scoring batches."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from data_fixtures import linked_cache, small_vocab  # pylint: disable=unused-import
from elm_jax.data import feature_converters as fc

TASK = "test_feature_converters_packing"


def _examples():
  rng = np.random.default_rng(3)
  return [{"inputs": rng.integers(3, 90, size=rng.integers(1, 30)).astype(np.int32),
           "targets": rng.integers(3, 90, size=rng.integers(1, 9)).astype(np.int32)}
          for _ in range(37)]


@pytest.fixture(name="packing_task")
def fixture_packing_task():
  examples = _examples()
  vocab = seqio.PassThroughVocabulary(size=100, eos_id=1)

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                          "targets": tf.TensorSpec([None], tf.int32)})

  seqio.TaskRegistry.add(
      TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)})
  yield examples
  seqio.TaskRegistry.remove(TASK)


def _packed_batches(pack=True, batch_size=3):
  dataset = fc.training_dataset(TASK, task_feature_lengths={"inputs": 40, "targets": 12},
                                batch_size=batch_size, shuffle=False, num_epochs=1, pack=pack)
  return list(dataset.as_numpy_iterator())


def _segments(tokens, segment_ids):
  return [tokens[segment_ids == s].tolist() for s in range(1, segment_ids.max() + 1)]


def test_packing_keeps_every_example_once(packing_task):
  found = []
  for row in _packed_batches(batch_size=None):  # Unbatched: nothing is dropped.
    inputs = _segments(row["encoder_input_tokens"], row["encoder_segment_ids"])
    targets = _segments(row["decoder_target_tokens"], row["decoder_segment_ids"])
    assert len(inputs) == len(targets)
    found.extend(zip(map(tuple, inputs), map(tuple, targets)))
  expected = [(tuple(e["inputs"].tolist() + [1]), tuple(e["targets"].tolist() + [1]))
              for e in packing_task]
  assert sorted(found) == sorted(expected)


def test_packing_shifts_targets_per_segment(packing_task):
  del packing_task
  batch = _packed_batches()[0]
  for row in range(batch["decoder_target_tokens"].shape[0]):
    segment_ids = batch["decoder_segment_ids"][row]
    for s in range(1, segment_ids.max() + 1):
      where = segment_ids == s
      targets = batch["decoder_target_tokens"][row][where]
      assert batch["decoder_input_tokens"][row][where].tolist() == [0] + targets[:-1].tolist()
      assert batch["decoder_positions"][row][where].tolist() == list(range(targets.size))


def test_packing_beats_padding(packing_task):
  del packing_task
  packed = np.mean([fc.packing_efficiency(b) for b in _packed_batches(pack=True)])
  padded = np.mean([fc.packing_efficiency(b) for b in _packed_batches(pack=False)])
  assert packed > padded


def test_packing_efficiency_counts_nonzero():
  batch = {"encoder_input_tokens": np.array([[5, 6, 0, 0]]),
           "decoder_target_tokens": np.array([[7, 0]])}
  assert fc.packing_efficiency(batch) == pytest.approx(3 / 6)


def test_log_packing_efficiency_passes_batches(caplog):
  batches = [{"encoder_input_tokens": np.ones([1, 2]), "decoder_target_tokens": np.ones([1, 2])}
             for _ in range(4)]
  with caplog.at_level("INFO"):
    assert list(fc.log_packing_efficiency(batches, every=2)) == batches
  assert "data/packing_efficiency: 1.000 over 4 batches" in caplog.text


SCORING = [
    {"inputs_pretokenized": "Is the sky blue?", "answer_choices": [b"yes", b"no"],
     "is_correct": [True, False], "idx": 0},
    {"inputs_pretokenized": "Pick the dates", "answer_choices": ["May 1", "a", "June 3", "b"],
     "is_correct": [True, False, True, False], "idx": 1},
    {"inputs_pretokenized": "One choice only", "answer_choices": ["the only one"],
     "is_correct": [True], "idx": 2},
]


def test_scoring_batch_reconstructs_choices(small_vocab):
  batches = list(fc.make_scoring_batches(SCORING, small_vocab, 2, enc_buckets=(8, 16),
                                         dec_buckets=(16, 32), choice_buckets=(2, 4)))
  rows = [(b, i) for b in batches for i in range(2) if b["example_index"][i] >= 0]
  assert len(rows) == len(SCORING)
  for batch, i in rows:
    example = SCORING[batch["example_index"][i]]
    segment_ids = batch["decoder_segment_ids"][i]
    for c, choice in enumerate(example["answer_choices"]):
      text = choice.decode() if isinstance(choice, bytes) else choice
      where = segment_ids == c + 1
      targets = batch["decoder_target_tokens"][i][where].tolist()
      assert targets == small_vocab.encode(text) + [1]
      assert batch["decoder_input_tokens"][i][where].tolist() == [0] + targets[:-1]
      assert batch["decoder_positions"][i][where].tolist() == list(range(len(targets)))
    num = len(example["answer_choices"])
    assert batch["choice_mask"][i].tolist() == [True] * num + [False] * (
        batch["choice_mask"].shape[1] - num)
    assert batch["is_correct"][i][:num].tolist() == example["is_correct"]
    encoder = batch["encoder_input_tokens"][i]
    assert encoder[encoder != 0].tolist() == small_vocab.encode(
        example["inputs_pretokenized"]) + [1]


def test_scoring_pads_last_batch(small_vocab):
  *_, last = fc.make_scoring_batches(SCORING, small_vocab, 2)
  assert last["example_index"].tolist() == [2, -1]
  assert last["idx"].tolist() == [2, -1]
  assert not last["choice_mask"][1].any()
  assert not last["decoder_segment_ids"][1].any()


def test_scoring_shapes_use_buckets(small_vocab):
  buckets = dict(enc_buckets=(8, 16, 64), dec_buckets=(8, 16, 32), choice_buckets=(2, 4, 8))
  shapes = {tuple(b[k].shape for k in ("encoder_input_tokens", "decoder_target_tokens",
                                       "choice_mask"))
            for b in fc.make_scoring_batches(SCORING[:1] * 3, small_vocab, 1, **buckets)}
  assert len(shapes) == 1
  ((enc, dec, choices),) = shapes
  assert enc[1] in (8, 16, 64)
  assert dec[1] in (8, 16, 32)
  assert choices[1] == 2


def test_scoring_takes_tokenized_inputs(small_vocab):
  example = dict(SCORING[0], inputs=np.array([9, 8, 7, 1], np.int32))
  (batch,) = fc.make_scoring_batches([example], small_vocab, 1)
  assert batch["encoder_input_tokens"][0, :4].tolist() == [9, 8, 7, 1]


def test_empty_choices_named(small_vocab):
  example = {"inputs_pretokenized": "x", "answer_choices": [], "is_correct": [], "idx": 41}
  with pytest.raises(ValueError, match="idx 41 of bigbench_demo has an empty answer_choices"):
    list(fc.make_scoring_batches([example], small_vocab, 2, task_name="bigbench_demo"))


def test_choices_longer_than_buckets_raise(small_vocab):
  with pytest.raises(ValueError, match="packed choice length .* exceeds the largest bucket 4"):
    list(fc.make_scoring_batches(SCORING[1:2], small_vocab, 1, dec_buckets=(4,)))


def _first_fit(examples, batch_size=4, drop_remainder=False):
  with_eos = [{"inputs": np.append(e["inputs"], 1), "targets": np.append(e["targets"], 1)}
               for e in examples]
  return list(fc.pack_first_fit(with_eos, task_feature_lengths={"inputs": 40, "targets": 12},
                                batch_size=batch_size, window=16, seed=2,
                                drop_remainder=drop_remainder))


def test_first_fit_keeps_every_example_once(packing_task):
  found = []
  for batch in _first_fit(packing_task):
    for row in range(batch["encoder_input_tokens"].shape[0]):
      inputs = _segments(batch["encoder_input_tokens"][row], batch["encoder_segment_ids"][row])
      targets = _segments(batch["decoder_target_tokens"][row], batch["decoder_segment_ids"][row])
      found.extend(zip(map(tuple, inputs), map(tuple, targets)))
  expected = [(tuple(e["inputs"].tolist() + [1]), tuple(e["targets"].tolist() + [1]))
              for e in packing_task]
  assert sorted(found) == sorted(expected)


def test_first_fit_matches_seqio_features(packing_task):
  seqio_keys = set(_packed_batches()[0])
  (batch, *_) = _first_fit(packing_task)
  assert set(batch) == seqio_keys
  for row in range(batch["decoder_target_tokens"].shape[0]):
    segment_ids = batch["decoder_segment_ids"][row]
    for s in range(1, segment_ids.max() + 1):
      where = segment_ids == s
      targets = batch["decoder_target_tokens"][row][where]
      assert batch["decoder_input_tokens"][row][where].tolist() == [0] + targets[:-1].tolist()
      assert batch["encoder_positions"][row][batch["encoder_segment_ids"][row] == s][0] == 0
    assert (batch["decoder_input_tokens"][row][segment_ids == 0] == 0).all()
  np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                batch["decoder_target_tokens"] != 0)


def test_first_fit_denser_than_seqio(packing_task):
  dense = np.mean([fc.packing_efficiency(b) for b in _first_fit(packing_task, 1)])
  greedy = np.mean([fc.packing_efficiency(b) for b in _packed_batches(batch_size=1)])
  assert dense >= greedy


def test_first_fit_drops_remainder(packing_task):
  rows = sum(b["encoder_input_tokens"].shape[0] for b in _first_fit(packing_task, 4))
  kept = sum(b["encoder_input_tokens"].shape[0]
             for b in _first_fit(packing_task, 4, drop_remainder=True))
  assert kept == rows - rows % 4


def _first_fit_dataset(window, seed, num_epochs=1, shuffle=False):
  converter = fc.FirstFitEncDecFeatureConverter(window=window, seed=seed)
  return seqio.get_dataset(TASK, task_feature_lengths={"inputs": 40, "targets": 12},
                           feature_converter=converter, dataset_split="train",
                           shuffle=shuffle, num_epochs=num_epochs, seed=5)


def _rows(batches):
  keys = sorted(batches[0])
  return sorted(tuple(tuple(b[k][r].tolist()) for k in keys)
                for b in batches for r in range(b[keys[0]].shape[0]))


def test_first_fit_converter_matches_numpy_rows(packing_task):
  rows = list(_first_fit_dataset(window=16, seed=2).as_numpy_iterator())
  assert set(rows[0]) == set(_packed_batches()[0])
  assert rows[0]["encoder_input_tokens"].shape == (40,)
  batched = [{k: v[None] for k, v in row.items()} for row in rows]
  # Row contents do not depend on the seed, only their order within a window does.
  assert _rows(batched) == _rows(_first_fit(packing_task, batch_size=1))


def test_first_fit_converter_is_denser_than_seqio(packing_task):
  del packing_task
  dense = [fc.packing_efficiency({k: v[None] for k, v in row.items()})
           for row in _first_fit_dataset(window=37, seed=0).as_numpy_iterator()]
  greedy = [fc.packing_efficiency(b) for b in _packed_batches(batch_size=1)]
  assert len(dense) < len(greedy)
  assert np.mean(dense) > np.mean(greedy)


def test_first_fit_converter_resumes_exactly(packing_task):
  del packing_task

  def tokens(dataset):
    return [row["encoder_input_tokens"].tolist() for row in dataset.as_numpy_iterator()]

  def stream():  # A new dataset, as the trainer builds on every start and resume.
    return _first_fit_dataset(window=8, seed=3, num_epochs=3, shuffle=True)

  full = tokens(stream())
  assert tokens(stream()) == full
  assert tokens(stream().skip(7)) == full[7:]
  other_seed = tokens(_first_fit_dataset(window=8, seed=4, num_epochs=3, shuffle=True))
  assert sorted(map(tuple, other_seed)) == sorted(map(tuple, full))
  assert other_seed != full


def test_first_fit_converter_rejects_empty_window():
  with pytest.raises(ValueError, match="window"):
    fc.FirstFitEncDecFeatureConverter(window=0)

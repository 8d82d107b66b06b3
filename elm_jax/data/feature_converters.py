"""Feature converters: packed training batches and grouped scoring batches.

Training uses seqio's `EncDecFeatureConverter` or `FirstFitEncDecFeatureConverter`
(the same features, packed denser); with packing, several examples share one row
and `*_segment_ids` / `*_positions` tell them apart.

Scoring (rank classification) packs the answer choices of one example into one
decoder row, so the encoder runs once per example:

  choices "yes", "no" (tokens [7] and [9, 4]), EOS = 1:
    decoder_target_tokens  7 1 9 4 1 0 0 0
    decoder_input_tokens   0 7 0 9 4 0 0 0
    decoder_segment_ids    1 1 2 2 2 0 0 0
    decoder_positions      0 1 0 1 2 0 0 0

`L_enc`, `L_dec` and the number of choices `C` are rounded up to the smallest
bucket that fits the batch, so a scorer compiles once per bucket combination.
"""

import dataclasses
import logging
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

DEFAULT_ENC_BUCKETS = (64, 128, 256, 512, 1024)
DEFAULT_DEC_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_CHOICE_BUCKETS = (2, 4, 8, 16, 32, 64, 128)


# ---------------------------------------------------------------------------
# Training.


def encdec_feature_converter(pack: bool = True) -> seqio.EncDecFeatureConverter:
  return seqio.EncDecFeatureConverter(pack=pack)


def training_dataset(mixture_or_task_name: str | seqio.Task | seqio.Mixture, *,
                     task_feature_lengths: Mapping[str, int], batch_size: int | None,
                     split: str = "train", shuffle: bool = True, seed: int | None = None,
                     pack: bool = True, num_epochs: int | None = None,
                     shard_info: seqio.ShardInfo | None = None) -> tf.data.Dataset:
  """Returns batched encoder-decoder training features of a Task or Mixture.

  Args:
    mixture_or_task_name: a registered name, or the Task or Mixture itself.
    task_feature_lengths: {"inputs": L_in, "targets": L_out}; longer examples
      are trimmed.
    batch_size: rows per batch (per host when `shard_info` is set); the last
      partial batch is dropped. None yields single rows.
    split: the split to read.
    shuffle: shuffle examples (seeded by `seed`).
    seed: the seed of shuffling, mixing and any random preprocessor.
    pack: pack several examples into one row.
    num_epochs: None repeats forever.
    shard_info: this host's shard of the data.
  """
  return seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      feature_converter=encdec_feature_converter(pack), dataset_split=split,
      shuffle=shuffle, num_epochs=num_epochs, shard_info=shard_info, seed=seed,
      batch_size=batch_size, verbose=False)


def packing_efficiency(batch: Mapping[str, Any]) -> float:
  """Returns the share of non-padding tokens among encoder inputs and decoder targets."""
  encoder = np.asarray(batch["encoder_input_tokens"])
  decoder = np.asarray(batch["decoder_target_tokens"])
  real = np.count_nonzero(encoder) + np.count_nonzero(decoder)
  return float(real) / float(encoder.size + decoder.size)


def log_packing_efficiency(batches: Iterable[Mapping[str, Any]], *,
                           every: int = 100) -> Iterator[Mapping[str, Any]]:
  """Yields the batches unchanged, logging their mean packing efficiency every `every`."""
  total, count = 0.0, 0
  for batch in batches:
    total += packing_efficiency(batch)
    count += 1
    if count % every == 0:
      logging.info("data/packing_efficiency: %.3f over %d batches.", total / count, count)
    yield batch


def _first_fit_rows(window: list[tuple[np.ndarray, np.ndarray]], lengths: tuple[int, int],
                    rng: np.random.Generator) -> list[list[tuple[np.ndarray, np.ndarray]]]:
  """Packs a window of (inputs, targets) pairs into rows, first-fit decreasing."""
  max_inputs, max_targets = lengths
  order = sorted(range(len(window)), key=lambda i: (-window[i][0].size, -window[i][1].size))
  rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
  room: list[list[int]] = []  # [inputs left, targets left] per row
  for i in order:
    inputs, targets = window[i]
    for r, (inputs_left, targets_left) in enumerate(room):
      if inputs.size <= inputs_left and targets.size <= targets_left:
        rows[r].append((inputs, targets))
        room[r][0] -= inputs.size
        room[r][1] -= targets.size
        break
    else:
      rows.append([(inputs, targets)])
      room.append([max_inputs - inputs.size, max_targets - targets.size])
  # Rows come out roughly sorted by size; shuffling them keeps batches mixed.
  return [rows[i] for i in rng.permutation(len(rows))]


def _packed_row(row: list[tuple[np.ndarray, np.ndarray]], lengths: tuple[int, int]
                ) -> dict[str, np.ndarray]:
  out = {}
  for side, length, index in (("encoder", lengths[0], 0), ("decoder", lengths[1], 1)):
    tokens = np.zeros([length], np.int32)
    segment_ids = np.zeros([length], np.int32)
    positions = np.zeros([length], np.int32)
    start = 0
    for segment, pair in enumerate(row, start=1):
      piece = pair[index]
      tokens[start:start + piece.size] = piece
      segment_ids[start:start + piece.size] = segment
      positions[start:start + piece.size] = np.arange(piece.size)
      start += piece.size
    name = "encoder_input_tokens" if side == "encoder" else "decoder_target_tokens"
    out[name] = tokens
    out[f"{side}_segment_ids"] = segment_ids
    out[f"{side}_positions"] = positions
  targets = out["decoder_target_tokens"]
  # Each segment shifted right by one, starting with 0 (seqio's bos_id).
  inputs = np.concatenate([[0], targets[:-1]]).astype(np.int32)
  inputs[out["decoder_positions"] == 0] = 0
  out["decoder_input_tokens"] = inputs
  out["decoder_loss_weights"] = (targets != 0).astype(np.int32)
  return out


def pack_first_fit(examples: Iterable[Mapping[str, Any]], *,
                   task_feature_lengths: Mapping[str, int], batch_size: int,
                   window: int = 1000, seed: int = 0,
                   drop_remainder: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Packs tokenized examples densely into encoder-decoder training batches.

  seqio's packing closes a row as soon as the next example does not fit. This
  packer collects `window` examples, places each (longest first) into the
  first row with room on both the encoder and the decoder side, and emits the
  rows in a seeded random order. The features and their meaning are those of
  `seqio.EncDecFeatureConverter(pack=True)`. On the held-in BIG-bench mixture
  it packs 256:16 and 512:32 rows about 93% full where seqio's packing
  reaches about 74% (benchmarks/input_pipeline.py).

  Args:
    examples: dicts with int `inputs` and `targets` (EOS included), for
      example a Task's `get_dataset(...).as_numpy_iterator()`.
    task_feature_lengths: {"inputs": L_in, "targets": L_out}; longer examples
      are trimmed to these lengths.
    batch_size: rows per batch.
    window: examples packed together; larger packs denser and costs memory.
    seed: the seed of the row order.
    drop_remainder: drop a last batch with fewer than `batch_size` rows.
  """
  lengths = (task_feature_lengths["inputs"], task_feature_lengths["targets"])
  rng = np.random.default_rng(seed)
  pending: list[dict[str, np.ndarray]] = []
  buffer: list[tuple[np.ndarray, np.ndarray]] = []

  def flush() -> Iterator[dict[str, np.ndarray]]:
    for row in _first_fit_rows(buffer, lengths, rng):
      pending.append(_packed_row(row, lengths))
      if len(pending) == batch_size:
        yield {k: np.stack([r[k] for r in pending]) for k in pending[0]}
        pending.clear()
    buffer.clear()

  for example in examples:
    buffer.append((np.asarray(example["inputs"], np.int32)[:lengths[0]],
                   np.asarray(example["targets"], np.int32)[:lengths[1]]))
    if len(buffer) == window:
      yield from flush()
  if buffer:
    yield from flush()
  if pending and not drop_remainder:
    yield {k: np.stack([r[k] for r in pending]) for k in pending[0]}


_PACKED_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
                    "decoder_target_tokens", "decoder_segment_ids", "decoder_positions",
                    "decoder_input_tokens", "decoder_loss_weights")


class FirstFitEncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """seqio's packed encoder-decoder features, packed first-fit decreasing in tf.data.

  This is the tf.data form of `pack_first_fit`. Examples are grouped in windows of
  `window`, and each window is packed by `_first_fit_rows`. Its rows come out in an
  order seeded by (`seed`, window number), so the stream is a pure function of its
  input and resumes exactly. The last window of a finite dataset may be smaller.
  Use it wherever `seqio.EncDecFeatureConverter(pack=True)` fits.

  Args:
    window: examples packed together; larger packs denser and costs memory.
    seed: the seed of the row order within each window.
  """

  def __init__(self, window: int = 1000, seed: int = 0, **kwargs):
    if window < 1:
      raise ValueError(f"window must be positive, got {window}.")
    super().__init__(pack=True, **kwargs)
    self._window = window
    self._seed = seed

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    lengths = (task_feature_lengths["inputs"], task_feature_lengths["targets"])
    seed = self._seed

    def trim(example):
      inputs = example["inputs"][:lengths[0]]
      targets = example["targets"][:lengths[1]]
      return {"inputs": inputs, "targets": targets,
              "inputs_length": tf.size(inputs), "targets_length": tf.size(targets)}

    def pack_window(index, inputs, inputs_length, targets, targets_length):
      window = [(inputs[i, :inputs_length[i]], targets[i, :targets_length[i]])
                for i in range(inputs.shape[0])]
      rng = np.random.default_rng([seed, int(index)])
      rows = [_packed_row(row, lengths) for row in _first_fit_rows(window, lengths, rng)]
      return tuple(np.stack([r[name] for r in rows]).astype(np.int32)
                   for name in _PACKED_FEATURES)

    def to_rows(index, batch):
      packed = tf.numpy_function(
          pack_window, [index, batch["inputs"], batch["inputs_length"], batch["targets"],
                        batch["targets_length"]], [tf.int32] * len(_PACKED_FEATURES),
          stateful=False)
      features = {}
      for name, value in zip(_PACKED_FEATURES, packed):
        length = lengths[0] if name.startswith("encoder") else lengths[1]
        features[name] = tf.ensure_shape(value, [None, length])
      return tf.data.Dataset.from_tensor_slices(features)

    ds = ds.map(trim, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.padded_batch(self._window, padded_shapes={
        "inputs": [lengths[0]], "targets": [lengths[1]], "inputs_length": [],
        "targets_length": []})
    return ds.enumerate().flat_map(to_rows)


# ---------------------------------------------------------------------------
# Scoring.


def bucket(length: int, buckets: Sequence[int], what: str) -> int:
  """Returns the smallest bucket >= length; raises ValueError when none fits."""
  for size in sorted(buckets):
    if size >= length:
      return size
  raise ValueError(f"{what} of {length} exceeds the largest bucket {max(buckets)}; "
                   "add a larger bucket.")


def _as_text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class _Row:
  inputs: np.ndarray        # [enc_len] with EOS
  choices: list[np.ndarray]  # each [choice_len] with EOS
  is_correct: np.ndarray    # [num_choices]
  example_index: int
  idx: int


@dataclasses.dataclass(frozen=True)
class ScoringBatcher:
  """Turns scoring examples into the grouped-choice batches of the scoring contract.

  Attributes:
    vocabulary: tokenizes the answer choices (and `inputs_pretokenized` when an
      example has no tokenized `inputs`).
    batch_size: rows per batch; the last batch is padded with rows whose
      `example_index` is -1.
    enc_buckets, dec_buckets, choice_buckets: allowed values of L_enc, L_dec, C.
    task_name: named in error messages.
  """
  vocabulary: seqio.Vocabulary
  batch_size: int
  enc_buckets: Sequence[int] = DEFAULT_ENC_BUCKETS
  dec_buckets: Sequence[int] = DEFAULT_DEC_BUCKETS
  choice_buckets: Sequence[int] = DEFAULT_CHOICE_BUCKETS
  task_name: str = "<unnamed task>"

  def _row(self, example: Mapping[str, Any], example_index: int) -> _Row:
    idx = int(example.get("idx", example_index))
    choices = [_as_text(c) for c in np.asarray(example["answer_choices"]).reshape(-1)]
    if not choices:
      raise ValueError(f"Example idx {idx} of {self.task_name} has an empty "
                       "answer_choices list; every scoring example needs choices.")
    is_correct = np.asarray(example["is_correct"], dtype=bool).reshape(-1)
    if is_correct.shape != (len(choices),):
      raise ValueError(f"Example idx {idx} of {self.task_name} has {len(choices)} choices "
                       f"but is_correct of shape {is_correct.shape}.")
    eos = self.vocabulary.eos_id
    if "inputs" in example:
      inputs = np.asarray(example["inputs"], dtype=np.int32)
    else:
      inputs = np.asarray(
          self.vocabulary.encode(_as_text(example["inputs_pretokenized"])) + [eos], np.int32)
    tokenized = [np.asarray(self.vocabulary.encode(c) + [eos], np.int32) for c in choices]
    return _Row(inputs, tokenized, is_correct, example_index, idx)

  def _batch(self, rows: list[_Row]) -> dict[str, np.ndarray]:
    enc_len = bucket(max(r.inputs.size for r in rows), self.enc_buckets,
                     f"{self.task_name}: encoder length")
    dec_len = bucket(max(sum(c.size for c in r.choices) for r in rows), self.dec_buckets,
                     f"{self.task_name}: packed choice length")
    num_choices = bucket(max(len(r.choices) for r in rows), self.choice_buckets,
                         f"{self.task_name}: number of choices")
    b = self.batch_size
    batch = {
        "encoder_input_tokens": np.zeros([b, enc_len], np.int32),
        "decoder_input_tokens": np.zeros([b, dec_len], np.int32),
        "decoder_target_tokens": np.zeros([b, dec_len], np.int32),
        "decoder_segment_ids": np.zeros([b, dec_len], np.int32),
        "decoder_positions": np.zeros([b, dec_len], np.int32),
        "choice_mask": np.zeros([b, num_choices], bool),
        "is_correct": np.zeros([b, num_choices], bool),
        "example_index": np.full([b], -1, np.int32),
        "idx": np.full([b], -1, np.int32),
    }
    for i, row in enumerate(rows):
      batch["encoder_input_tokens"][i, :row.inputs.size] = row.inputs
      start = 0
      for c, tokens in enumerate(row.choices):
        end = start + tokens.size
        batch["decoder_target_tokens"][i, start:end] = tokens
        batch["decoder_input_tokens"][i, start + 1:end] = tokens[:-1]  # [start] stays 0
        batch["decoder_segment_ids"][i, start:end] = c + 1
        batch["decoder_positions"][i, start:end] = np.arange(tokens.size)
        start = end
      batch["choice_mask"][i, :len(row.choices)] = True
      batch["is_correct"][i, :len(row.choices)] = row.is_correct
      batch["example_index"][i] = row.example_index
      batch["idx"][i] = row.idx
    return batch

  def __call__(self, examples: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches; `example_index` is each example's position in `examples`.

    Each example needs `answer_choices` (str or bytes [C]), `is_correct`
    (bool [C]), and `inputs` (token ids with EOS) or `inputs_pretokenized`;
    `idx` is optional and copied to the extra `idx` feature.

    Raises:
      ValueError: an example has no choices, or a length exceeds every bucket;
        the message names the task and the example's idx.
    """
    rows: list[_Row] = []
    for example_index, example in enumerate(examples):
      rows.append(self._row(example, example_index))
      if len(rows) == self.batch_size:
        yield self._batch(rows)
        rows = []
    if rows:
      yield self._batch(rows)


def make_scoring_batches(examples: Iterable[Mapping[str, Any]], vocabulary: seqio.Vocabulary,
                         batch_size: int, *,
                         enc_buckets: Sequence[int] = DEFAULT_ENC_BUCKETS,
                         dec_buckets: Sequence[int] = DEFAULT_DEC_BUCKETS,
                         choice_buckets: Sequence[int] = DEFAULT_CHOICE_BUCKETS,
                         task_name: str = "<unnamed task>") -> Iterator[dict[str, np.ndarray]]:
  """Yields scoring batches; see `ScoringBatcher`."""
  return ScoringBatcher(vocabulary, batch_size, tuple(enc_buckets), tuple(dec_buckets),
                        tuple(choice_buckets), task_name)(examples)

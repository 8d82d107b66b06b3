"""Training batches from a seqio Task or Mixture, resumable at any batch.

Exact resume: the training stream is a pure function of (provider, split, feature
lengths, feature converter, seed, shard). It repeats forever, shuffles with the
fixed seed, and a resumed run rebuilds it and skips the batches consumed before
the checkpoint. Skipping reads and discards those batches, which costs time
proportional to the position; it keeps the data order bitwise identical to an
uninterrupted run (tested by tests/test_train_resume.py).

Multi-host: process i of n reads shard i of n (`seqio.ShardInfo`) and yields
batches of `global_batch_size / n` rows; the trainer assembles global arrays.
"""

import dataclasses
import difflib
import hashlib
import math
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import numpy as np
import seqio
import tensorflow as tf

from elm_jax.data import feature_converters

# Ways to fill training rows: one example each ("none"), seqio's packer, which closes a
# row when the next example does not fit, or first-fit decreasing over windows.
PACKERS = ("none", "seqio", "first_fit")
Batch = dict[str, np.ndarray]
BatchTransform = Callable[[int, Batch], Batch]

# Number of examples whose tokens enter the data hash.
DATA_HASH_EXAMPLES = 1000


def get_provider(name_or_provider: "str | seqio.DatasetProviderBase") -> seqio.DatasetProviderBase:
  """Look up a registered Task or Mixture; an unknown name lists the nearest ones."""
  if not isinstance(name_or_provider, str):
    return name_or_provider
  name = name_or_provider
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Nearest registered names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"No seqio Task or Mixture named {name!r} is registered ({len(names)} are).{hint} "
        f"Import the module that registers it, e.g. with the gin binding "
        f"TASK_MODULES = ['elm_jax.tasks.bigbench'].") from e


def provider_tasks(provider: seqio.DatasetProviderBase) -> list[seqio.Task]:
  if isinstance(provider, seqio.Mixture):
    return list(provider.tasks)
  return [provider]


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What defines the training stream; stored in checkpoints to check a resume."""
  provider_name: str
  split: str
  feature_lengths: tuple[tuple[str, int], ...]
  global_batch_size: int
  seed: int
  packing: str

  def to_json(self) -> dict[str, Any]:
    return {"provider": self.provider_name, "split": self.split,
            "feature_lengths": dict(self.feature_lengths),
            "global_batch_size": self.global_batch_size, "seed": self.seed,
            "packing": self.packing}


def packer_name(packing: bool | str) -> str:
  """Returns one of PACKERS; True means "first_fit", the denser packer."""
  if packing is True:
    return "first_fit"
  if packing is False:
    return "none"
  if packing not in PACKERS:
    raise ValueError(f"packing={packing!r} is not True, False or one of {PACKERS}.")
  return packing


def make_feature_converter(packing: str, seed: int) -> seqio.FeatureConverter:
  """Returns the encoder-decoder feature converter of a `packer_name` value."""
  if packing == "first_fit":
    return feature_converters.FirstFitEncDecFeatureConverter(seed=seed)
  return seqio.EncDecFeatureConverter(pack=packing == "seqio")


def _converted(provider: seqio.DatasetProviderBase, *, split: str,
               feature_lengths: Mapping[str, int], feature_converter: seqio.FeatureConverter,
               shuffle: bool, seed: int | None, num_epochs: int | None,
               shard_info: seqio.ShardInfo | None) -> tf.data.Dataset:
  dataset = provider.get_dataset(
      sequence_length=dict(feature_lengths), split=split, use_cached=False,
      shuffle=shuffle, seed=seed, shard_info=shard_info, num_epochs=num_epochs)
  return feature_converter(dataset, dict(feature_lengths))


def train_dataset(provider: seqio.DatasetProviderBase, *, spec: DataSpec,
                  feature_converter: seqio.FeatureConverter, process_index: int,
                  process_count: int, skip_batches: int = 0) -> tf.data.Dataset:
  """The endless, shuffled stream of this process's batches, `skip_batches` skipped."""
  if spec.global_batch_size % process_count:
    raise ValueError(f"batch_size={spec.global_batch_size} is not divisible by the "
                     f"{process_count} processes; use a multiple of {process_count}.")
  shard_info = None
  if process_count > 1:
    shard_info = seqio.ShardInfo(index=process_index, num_shards=process_count)
  dataset = _converted(provider, split=spec.split, feature_lengths=dict(spec.feature_lengths),
                       feature_converter=feature_converter, shuffle=True, seed=spec.seed,
                       num_epochs=None, shard_info=shard_info)
  local_batch = spec.global_batch_size // process_count
  dataset = dataset.batch(local_batch, drop_remainder=True)
  if skip_batches:
    logging.info("Skipping %d batches to resume the data stream where the checkpoint "
                 "left it.", skip_batches)
    dataset = dataset.skip(skip_batches)
  return dataset.prefetch(tf.data.AUTOTUNE)


def batches_per_epoch(provider: seqio.DatasetProviderBase, *, spec: DataSpec,
                      feature_converter: seqio.FeatureConverter) -> int:
  """Global batches in one pass over the split (of every Task of a Mixture).

  Counted by converting one unshuffled pass, so packing is accounted for. For a
  Mixture the Tasks' rows are added up, which ignores the mixing rates: an
  "epoch" of a Mixture is as many rows as all its Tasks have together.
  """
  rows = 0
  for task in provider_tasks(provider):
    dataset = _converted(task, split=spec.split, feature_lengths=dict(spec.feature_lengths),
                         feature_converter=feature_converter, shuffle=False, seed=None,
                         num_epochs=1, shard_info=None)
    rows += int(dataset.reduce(np.int64(0), lambda count, _: count + 1).numpy())
  if rows == 0:
    raise ValueError(f"{spec.provider_name!r} split {spec.split!r} has no examples.")
  return max(1, math.ceil(rows / spec.global_batch_size))


def data_hash(provider: seqio.DatasetProviderBase, *, spec: DataSpec,
              num_examples: int = DATA_HASH_EXAMPLES) -> str:
  """sha256 over the data settings and the tokens of the first examples.

  The hashed text is the JSON of `spec` followed by the `inputs` and `targets`
  token ids of the first `num_examples` examples of each Task's split in source
  order (unshuffled, before feature conversion). Two runs with equal hashes
  trained on the same data in the same order, up to examples past the first
  `num_examples` of each Task.
  """
  digest = hashlib.sha256(repr(sorted(spec.to_json().items())).encode())
  for task in provider_tasks(provider):
    digest.update(task.name.encode())
    dataset = task.get_dataset(sequence_length=dict(spec.feature_lengths), split=spec.split,
                               use_cached=False, shuffle=False, num_epochs=1)
    for example in dataset.take(num_examples).as_numpy_iterator():
      for key in ("inputs", "targets"):
        digest.update(np.asarray(example[key], np.int32).tobytes())
        digest.update(b"|")
  return digest.hexdigest()


class BatchIterator:
  """Numpy batches with the count of batches consumed (the data position)."""

  def __init__(self, dataset: tf.data.Dataset, *, start_position: int,
               transform: BatchTransform | None = None):
    self._iterator = dataset.as_numpy_iterator()
    self.position = start_position
    self._transform = transform

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> Batch:
    batch = {k: np.asarray(v) for k, v in next(self._iterator).items()}
    # Loss weights travel as float32, so the step compiles once whatever the source.
    if "decoder_loss_weights" in batch:
      batch["decoder_loss_weights"] = batch["decoder_loss_weights"].astype(np.float32)
    self.position += 1
    if self._transform is not None:
      batch = self._transform(self.position, batch)
    return batch


def eval_batches(provider: seqio.DatasetProviderBase, *, split: str,
                 feature_lengths: Mapping[str, int], feature_converter: seqio.FeatureConverter,
                 batch_size: int, max_batches: int | None) -> Iterator[Batch]:
  """Unshuffled batches of a validation split; the last one padded with zero rows."""
  dataset = _converted(provider, split=split, feature_lengths=feature_lengths,
                       feature_converter=feature_converter, shuffle=False, seed=None,
                       num_epochs=1, shard_info=None)
  dataset = dataset.batch(batch_size, drop_remainder=False)
  if max_batches is not None:
    dataset = dataset.take(max_batches)
  for batch in dataset.as_numpy_iterator():
    batch = {k: np.asarray(v) for k, v in batch.items()}
    rows = next(iter(batch.values())).shape[0]
    if rows < batch_size:
      # Padding rows are all zeros, so their loss weights are zero.
      batch = {k: np.concatenate([v, np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    batch["decoder_loss_weights"] = batch["decoder_loss_weights"].astype(np.float32)
    yield batch


def has_split(provider: seqio.DatasetProviderBase, split: str) -> bool:
  try:
    return all(split in task.splits for task in provider_tasks(provider))
  except (AttributeError, NotImplementedError):
    return False

"""T5 span corruption, written for this project (no dependency on the `t5` package).

Span corruption (Raffel et al., 2020, section 3.1.4) turns a token sequence into
a denoising pair. About `noise_density` of the tokens, in spans of mean length
`mean_noise_span_length`, are noise. In `inputs` each noise span is replaced by
one sentinel id; `targets` lists, for each span, its sentinel followed by the
span's tokens. With tokens `a b c d e f g h` and noise spans `c d` and `g`:

  inputs  = a b <X> e f <Y> h
  targets = <X> c d <Y> g

Sentinels are the vocabulary's extra ids in seqio's convention: span i gets
`vocab_size - 1 - i` (`<extra_id_0>` is the last id). Noise masks come from
stateless random ops seeded by seqio's map seeds, so a Task read with a fixed
`seed` yields the same examples every time.

The pretraining Task concatenates tokenized documents and cuts them into
chunks of `tokens_length_for(inputs_length)` tokens, chosen so that the
corrupted inputs plus EOS fill `inputs_length` exactly (for 256: 284 tokens in,
targets of `targets_length_for(256)` = 62 tokens with EOS).
"""

import functools
import os

import seqio
import tensorflow as tf

from elm_jax.data import bigbench

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def _num_noise(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """Returns (noise tokens, noise spans) for a sequence of `length` tokens."""
  num_noise_tokens = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise_tokens / mean_span)), 1)
  return num_noise_tokens, num_spans


def tokens_length_for(inputs_length: int, noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> int:
  """Returns the longest chunk whose corrupted inputs, plus EOS, fit `inputs_length`."""
  tokens_length = inputs_length
  while True:
    noise, spans = _num_noise(tokens_length + 1, noise_density, mean_noise_span_length)
    if tokens_length + 1 - noise + spans + 1 > inputs_length:
      return tokens_length
    tokens_length += 1


def targets_length_for(inputs_length: int, noise_density: float = NOISE_DENSITY,
                       mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> int:
  """Returns the targets length, EOS included, of a full chunk for `inputs_length`."""
  tokens_length = tokens_length_for(inputs_length, noise_density, mean_noise_span_length)
  noise, spans = _num_noise(tokens_length, noise_density, mean_noise_span_length)
  return noise + spans + 1


def random_spans_noise_mask(length: tf.Tensor, seed: tf.Tensor, *,
                            noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                            ) -> tf.Tensor:
  """Returns a bool [length] mask of noise spans; the sequence starts with non-noise.

  Noise and non-noise tokens are each split into `num_spans` segments of
  random positive lengths (a stateless random partition), then interleaved as
  non-noise, noise, non-noise, noise, ...

  Args:
    length: a scalar int32, at least 2.
    seed: an int32 [2] stateless seed.
  """
  length = tf.cast(length, tf.int32)
  length_f = tf.cast(length, tf.float32)
  num_noise = tf.cast(tf.round(length_f * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.maximum(tf.cast(
      tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32), 1)
  # A span cannot be shorter than one token.
  num_spans = tf.minimum(num_spans, tf.minimum(num_noise, length - num_noise))
  seeds = tf.random.experimental.stateless_split(seed, 2)

  def partition(num_items, part_seed):
    # Choose num_spans - 1 distinct cut points among the num_items - 1 gaps.
    order = tf.argsort(tf.random.stateless_uniform([num_items - 1], part_seed))
    cuts = tf.sort(order[:num_spans - 1]) + 1
    bounds = tf.concat([[0], cuts, [num_items]], axis=0)
    return bounds[1:] - bounds[:-1]  # [num_spans], positive, sums to num_items

  noise_lengths = partition(num_noise, seeds[0])
  nonnoise_lengths = partition(length - num_noise, seeds[1])
  # [num_spans, 2] -> [2 * num_spans]: non-noise, noise, non-noise, noise, ...
  span_lengths = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
  span_ids = tf.repeat(tf.range(2 * num_spans), span_lengths)  # [length]
  return tf.equal(span_ids % 2, 1)


def _replace_spans_with_sentinels(tokens: tf.Tensor, mask: tf.Tensor,
                                  vocab_size: int) -> tf.Tensor:
  """Replaces each run of masked tokens with one sentinel, counting runs from 0."""
  previous = tf.concat([[False], mask[:-1]], axis=0)
  first = tf.logical_and(mask, tf.logical_not(previous))
  sentinels = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
  replaced = tf.where(first, sentinels, tokens)
  return tf.boolean_mask(replaced, tf.logical_or(first, tf.logical_not(mask)))


def corrupt(tokens: tf.Tensor, seed: tf.Tensor, vocab_size: int, *,
            noise_density: float = NOISE_DENSITY,
            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
            ) -> tuple[tf.Tensor, tf.Tensor]:
  """Returns (inputs, targets) of one token sequence of at least 2 tokens."""
  mask = random_spans_noise_mask(
      tf.size(tokens), seed, noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length)
  inputs = _replace_spans_with_sentinels(tokens, mask, vocab_size)
  # The non-noise runs of the targets take the same sentinels because the
  # sequence starts with non-noise: run i of non-noise precedes noise span i.
  targets = _replace_spans_with_sentinels(tokens, tf.logical_not(mask), vocab_size)
  return inputs, targets


def span_corruption(dataset: tf.data.Dataset, sequence_length: dict[str, int],
                    output_features: dict[str, seqio.Feature], *,
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                    ) -> tf.data.Dataset:
  """Turns tokenized `targets` documents into span-corruption examples.

  Documents are concatenated and cut into chunks of
  `tokens_length_for(sequence_length["inputs"])` tokens; chunks shorter than
  2 tokens are dropped. Output `inputs` and `targets` carry no EOS yet.
  """
  vocabulary = output_features["targets"].vocabulary
  if vocabulary.extra_ids <= 0:
    raise ValueError(f"Span corruption needs sentinel extra ids, but {vocabulary} has none.")
  tokens_length = tokens_length_for(sequence_length["inputs"], noise_density,
                                    mean_noise_span_length)
  chunks = (dataset.map(lambda ex: ex["targets"], num_parallel_calls=tf.data.AUTOTUNE)
            .unbatch().batch(tokens_length)
            .filter(lambda chunk: tf.size(chunk) >= 2))

  @seqio.map_over_dataset(num_seeds=1)
  def denoise(chunk, seed):
    inputs, targets = corrupt(chunk, seed, vocabulary.vocab_size,
                              noise_density=noise_density,
                              mean_noise_span_length=mean_noise_span_length)
    return {"inputs": inputs, "targets": targets}

  return denoise(chunks)


def _text_dataset_fn(cache, examples_per_task):
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed
    if split != "train":
      raise ValueError(f"{split!r} is not a split of the span-corruption Task; use 'train'.")
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": text} for text in bigbench.held_in_text(
            cache=cache, examples_per_task=examples_per_task, max_chars=1 << 30)),
        output_signature={"targets": tf.TensorSpec([], tf.string)})
  return dataset_fn


def register_pretrain_task(name: str, *, vocabulary: seqio.Vocabulary,
                           cache: str | os.PathLike[str] | None = None,
                           examples_per_task: int = 2000) -> seqio.Task:
  """Registers span corruption over held-in BIG-bench training text as a Task.

  The text is the prompt and target of each train-split example of the held-in
  task files (never the 13 evaluation tasks), `examples_per_task` per file.
  Read it with sequence lengths {"inputs": n, "targets": targets_length_for(n)}.
  """
  output_features = {
      "inputs": seqio.Feature(vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          _text_dataset_fn(cache, examples_per_task), splits=("train",)),
      preprocessors=[
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          span_corruption,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=output_features,
      metric_fns=[])

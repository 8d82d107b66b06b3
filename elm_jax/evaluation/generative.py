"""Generative evaluation: decode each input, then score the texts with metrics.

Inputs are 0-padded to a length bucket (the next power of two, at least
`MIN_INPUT_BUCKET`) and batches are padded to `batch_size` rows, so the jitted
decoders of `elm_jax.models.decoding` compile once per bucket. Predictions are
detokenized up to the first EOS and scored against the references with
`elm_jax.evaluation.metrics`.

References of an example: its `references` feature (a list of strings) when the
Task has one, else `[targets_pretokenized]`. The SARI source is
`inputs_pretokenized`, or the feature named by `source_key`.
"""

import dataclasses
from typing import Any, Iterable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np

from elm_jax.evaluation import metrics as metrics_lib
from elm_jax.evaluation import scorer as scorer_lib
from elm_jax.models import decoding
from elm_jax.models import t5

MIN_INPUT_BUCKET = 16
DECODING_METHODS = ("greedy", "beam")


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """Search method and limits of decoding.

  Attributes:
    method: "greedy" or "beam".
    max_decode_length: generated tokens at most, EOS included.
    num_beams: beams for "beam"; the best beam is the prediction.
    length_penalty: beam-search length normalization exponent.
    max_input_length: inputs longer than this are cut (EOS kept last).
  """
  method: str = "greedy"
  max_decode_length: int = 64
  num_beams: int = 4
  length_penalty: float = 1.0
  max_input_length: int = 512

  def __post_init__(self):
    if self.method not in DECODING_METHODS:
      raise ValueError(f"DecodingConfig.method={self.method!r} is not one of "
                       f"{DECODING_METHODS}.")
    if self.max_decode_length < 1 or self.max_input_length < 1 or self.num_beams < 1:
      raise ValueError("max_decode_length, max_input_length and num_beams must be >= 1; "
                       f"got {self.max_decode_length}, {self.max_input_length}, "
                       f"{self.num_beams}.")


def input_bucket(length: int, max_length: int) -> int:
  """Returns the padded input length: the next power of two >= length, capped."""
  bucket = MIN_INPUT_BUCKET
  while bucket < length:
    bucket *= 2
  return min(bucket, max(max_length, 1))


def _pad_inputs(token_lists: Sequence[Sequence[int]], *, batch_size: int,
                max_length: int) -> np.ndarray:
  length = input_bucket(max(len(t) for t in token_lists), max_length)
  out = np.zeros((batch_size, length), np.int32)
  for row, tokens in enumerate(token_lists):
    tokens = list(tokens)
    if len(tokens) > length:
      tokens = tokens[:length - 1] + [tokens[-1]]  # Keep the EOS.
    out[row, :len(tokens)] = tokens
  return out


def generate_tokens(params: Any, encoder_input_tokens: np.ndarray, *, config: t5.T5Config,
                    decoding_config: DecodingConfig) -> np.ndarray:
  """Decodes a padded batch; returns int32 `[batch, max_decode_length]`, 0 after EOS."""
  if decoding_config.method == "greedy":
    tokens, _ = decoding.greedy_decode(
        params, encoder_input_tokens, config=config,
        max_decode_length=decoding_config.max_decode_length)
  else:
    tokens, _ = decoding.beam_search(
        params, encoder_input_tokens, config=config, num_beams=decoding_config.num_beams,
        max_decode_length=decoding_config.max_decode_length,
        length_penalty=decoding_config.length_penalty)
    tokens = tokens[:, 0]  # The best beam.
  return np.asarray(tokens)


def _until_eos(tokens: np.ndarray) -> list[int]:
  out = []
  for token in tokens.tolist():
    if token == decoding.EOS_ID:
      break
    out.append(token)
  return out


def _references(example: Mapping[str, Any]) -> list[str]:
  refs = example.get("references")
  if refs is not None and len(refs) > 0:
    return list(refs)
  return [example["targets_pretokenized"]]


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def generate_examples(examples: Iterable[Mapping[str, Any]], *, config: t5.T5Config,
                      params: Any, vocabulary, batch_size: int,
                      decoding_config: DecodingConfig = DecodingConfig(),
                      task_name: str = "", source_key: str = "inputs_pretokenized"
                      ) -> list[dict[str, Any]]:
  """Decodes tokenized examples; returns one record per example.

  Each record has `task`, `idx`, `prediction` (text), `references` (texts) and
  `source` (the SARI source text, or "" when the example lacks it).
  """
  records = []
  for position, chunk in enumerate(_batched(examples, batch_size)):
    inputs = [list(np.asarray(ex["inputs"])) for ex in chunk]
    padded = _pad_inputs(inputs, batch_size=batch_size,
                         max_length=decoding_config.max_input_length)
    tokens = generate_tokens(params, padded, config=config, decoding_config=decoding_config)
    for row, example in enumerate(chunk):
      records.append({
          "task": task_name,
          "idx": int(example.get("idx", position * batch_size + row)),
          "prediction": vocabulary.decode(_until_eos(tokens[row])),
          "references": _references(example),
          "source": str(example.get(source_key, "")),
      })
  return records


def score_records(records: Sequence[Mapping[str, Any]],
                  metric_names: Sequence[str] = ("exact_match", "rouge", "bleu")
                  ) -> dict[str, float]:
  """Computes corpus metrics over generation records (see `generate_examples`)."""
  if not records:
    return {}
  return metrics_lib.compute_metrics(
      metric_names, predictions=[r["prediction"] for r in records],
      references=[r["references"] for r in records],
      sources=[r["source"] for r in records])


def evaluate_generative_task(task_name: str, *, config: t5.T5Config, params: Any,
                             vocabulary, batch_size: int, split: str = "validation",
                             max_examples: int | None = None,
                             decoding_config: DecodingConfig = DecodingConfig(),
                             metric_names: Sequence[str] = ("exact_match", "rouge", "bleu")
                             ) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """Decodes a Task split and scores it; returns (records, metrics)."""
  examples = scorer_lib.task_examples(task_name, split=split, max_examples=max_examples)
  records = generate_examples(examples, config=config, params=params, vocabulary=vocabulary,
                              batch_size=batch_size, decoding_config=decoding_config,
                              task_name=task_name)
  if not records:
    logging.warning("Task %s split %s has no examples.", task_name, split)
  return records, score_records(records, metric_names)

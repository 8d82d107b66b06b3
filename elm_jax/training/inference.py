"""`infer()`: decode a Task's split with a trained model and write the predictions.

Predictions go to a JSON Lines file, one object per example:
`{"index", "inputs", "target", "prediction"}` (detokenized strings).
"""

import json
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from elm_jax import file_io
from elm_jax.checkpoints import experts
from elm_jax.checkpoints import loading
from elm_jax.models import decoding
from elm_jax.models import t5
from elm_jax.training import checkpointing
from elm_jax.training import input_pipeline

DECODE_MODES = ("greedy", "beam")


def _load_params(checkpoint_path: str, model_config: t5.T5Config | None,
                 expert_path: str | None) -> tuple[t5.T5Config, dict[str, Any]]:
  if checkpointing.is_orbax_model_dir(checkpoint_path):
    config, params = checkpointing.load_trained_params(checkpoint_path)
  else:
    config, params = loading.load_model(checkpoint_path, model_config)
  if expert_path is not None:
    metadata, expert_params = experts.load_expert(expert_path, base_params=params)
    config = t5.T5Config.from_dict(metadata.model_config)
    # Start from a model with the expert's adapters or LoRA, then overwrite.
    fresh = t5.init_params(config, jax.random.PRNGKey(0))
    merged = experts.apply_expert(fresh, params)
    params = experts.apply_expert(merged, expert_params)
  return model_config or config, params


def infer(*, checkpoint_path: str, task_name: str, feature_lengths: Mapping[str, int],
          output_path: str, model_config: t5.T5Config | None = None,
          expert_path: str | None = None, split: str = "validation", batch_size: int = 16,
          decode: str = "greedy", num_beams: int = 4, max_decode_length: int | None = None,
          max_examples: int | None = None, config_text: str | None = None) -> str:
  """Decode `task_name`'s `split` and write `output_path` (JSON Lines); return it.

  Args:
    checkpoint_path: an elm-jax model directory (trained parameters, adapters
      included), or a Hugging Face or T5X checkpoint.
    task_name: a registered seqio Task or Mixture.
    feature_lengths: {"inputs": n, "targets": m}; inputs are truncated to n.
    output_path: the JSON Lines file to write (atomically).
    model_config: the model; None reads it from the checkpoint.
    expert_path: an expert folder applied onto the checkpoint's base.
    split: the split to decode.
    batch_size: rows per decoding call (the last batch is zero-padded).
    decode: "greedy" or "beam".
    num_beams: beams for "beam".
    max_decode_length: tokens to generate (default: feature_lengths["targets"]).
    max_examples: decode at most this many examples.
    config_text: unused; accepted so that `elm_jax.train.run` can pass it.
  """
  del config_text
  if decode not in DECODE_MODES:
    raise ValueError(f"decode={decode!r} is not one of {DECODE_MODES}.")
  config, params = _load_params(checkpoint_path, model_config, expert_path)
  params = jax.tree.map(jnp.asarray, params)
  provider = input_pipeline.get_provider(task_name)
  vocabulary = provider.output_features["targets"].vocabulary
  length = max_decode_length or int(feature_lengths["targets"])
  dataset = provider.get_dataset(sequence_length=dict(feature_lengths), split=split,
                                 shuffle=False, num_epochs=1, use_cached=False)
  if max_examples is not None:
    dataset = dataset.take(max_examples)

  def flush(rows: list[dict[str, Any]], out) -> None:
    tokens = np.zeros((batch_size, int(feature_lengths["inputs"])), np.int32)
    for i, row in enumerate(rows):
      ids = row["inputs"][:tokens.shape[1]]
      tokens[i, :len(ids)] = ids
    if decode == "greedy":
      outputs, _ = decoding.greedy_decode(params, jnp.asarray(tokens), config=config,
                                          max_decode_length=length)
    else:
      outputs, _ = decoding.beam_search(params, jnp.asarray(tokens), config=config,
                                        num_beams=num_beams, max_decode_length=length)
    outputs = np.asarray(outputs)
    if outputs.ndim == 3:  # [batch, beams, length]: the best beam comes first.
      outputs = outputs[:, 0]
    for i, row in enumerate(rows):
      predicted = [int(t) for t in outputs[i] if t > 1]
      record = {"index": row["index"], "inputs": vocabulary.decode(row["inputs"].tolist()),
                "target": vocabulary.decode(row["targets"].tolist()),
                "prediction": vocabulary.decode(predicted)}
      out.write(json.dumps(record, ensure_ascii=False) + "\n")

  count = 0
  with file_io.atomic_writer(output_path) as out:
    rows: list[dict[str, Any]] = []
    for example in dataset.as_numpy_iterator():
      rows.append({"index": count, "inputs": np.asarray(example["inputs"]),
                   "targets": np.asarray(example["targets"])})
      count += 1
      if len(rows) == batch_size:
        flush(rows, out)
        rows = []
    if rows:
      flush(rows, out)
  logging.info("Wrote %d predictions of %s (%s) to %s.", count, task_name, split, output_path)
  return output_path

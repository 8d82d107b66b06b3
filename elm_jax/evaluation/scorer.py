"""Rank classification: score every answer choice, predict the best one.

The score of a choice is computed from the log-probabilities of its target tokens
(the choice's tokens followed by EOS) given the input. The batch layout is the
scoring layout of docs/architecture.md: all choices of one example share one
decoder row (`decoder_segment_ids` = choice index + 1), so the encoder runs once
per example, and its output and the cross-attention keys and values serve every
choice. `naive_scores` is the reference: one full encoder-decoder pass per
(example, choice) row, nothing shared.

Score normalizations (`ScoringConfig.normalization`), with S the sum of the
choice's token log-probabilities and n its number of target tokens (EOS
included):

- "sum": S. The rule of T0 and of the Expert Language Models paper, and the
  default. It favours short choices, since every token adds a negative term.
- "mean": S / n, the per-token mean log-probability, also called
  length-normalized scoring (a token-count normalization, unlike the per-character
  normalization of some harnesses).
- "length_penalty": S / n ** alpha with `length_penalty_alpha` alpha. alpha = 0
  is "sum" and alpha = 1 is "mean", and values in between only partly remove the
  length bias. This is the plain power; GNMT's ((5 + n) / 6) ** alpha is not
  implemented.

Prediction: the argmax of the scores over the example's real choices. On an
exact tie the lowest choice index wins (`jnp.argmax` returns the first maximum).
The example counts as correct when the predicted choice is any correct choice,
so several correct choices are allowed.
"""

import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from elm_jax.models import t5

Batch = Mapping[str, np.ndarray]
Params = Any

NORMALIZATIONS = ("sum", "mean", "length_penalty")


class ScoringError(ValueError):
  """An example cannot be scored (for example, it has no answer choices)."""


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  """Score normalization settings; see the module docstring."""
  normalization: str = "sum"
  length_penalty_alpha: float = 1.0

  def __post_init__(self):
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r} is not one of "
                       f"{', '.join(NORMALIZATIONS)}.")
    if not math.isfinite(self.length_penalty_alpha) or self.length_penalty_alpha < 0:
      raise ValueError("length_penalty_alpha must be a finite number >= 0, got "
                       f"{self.length_penalty_alpha}.")


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Returns log p(target token) `[batch, length]` in float32, 0 where target is 0."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, L, V]
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, L]
  return jnp.where(targets > 0, picked, 0.0)


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int
                 ) -> jax.Array:
  """Sums `values` [B, L] per segment id 1..num_segments into `[B, num_segments]`."""
  one_hot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=values.dtype)  # [B, L, C]
  # Segment id 0 (padding) becomes index -1, which one_hot maps to all zeros.
  return jnp.einsum("bl,blc->bc", values, one_hot)


def normalize_scores(sums: jax.Array, lengths: jax.Array, scoring: ScoringConfig
                     ) -> jax.Array:
  """Applies the normalization of `scoring` to summed log-probabilities."""
  if scoring.normalization == "sum":
    return sums
  safe_lengths = jnp.maximum(lengths, 1).astype(jnp.float32)
  if scoring.normalization == "mean":
    return sums / safe_lengths
  return sums / safe_lengths ** scoring.length_penalty_alpha


def predict(scores: np.ndarray, choice_mask: np.ndarray) -> np.ndarray:
  """Argmax over real choices `[B]`; ties go to the lowest index."""
  masked = np.where(choice_mask, scores, -np.inf)
  return np.argmax(masked, axis=-1)


class ChoiceScorer:
  """Jitted shared-encoder scorer for one model definition.

  The jitted function takes the parameters as an argument, so experts applied to
  the same base, merged experts and the base itself reuse one compilation per
  batch shape. `trace_count` counts traces (one per new shape bucket).
  """

  def __init__(self, model: t5.T5, *, scoring: ScoringConfig = ScoringConfig()):
    # NOTE: plain jax.jit without a mesh or sharding rules: batches and
    # parameters sit on the default device, so models that need model
    # parallelism are not yet supported here.
    self.model = model
    self.scoring = scoring
    self.trace_count = 0
    self._jitted = jax.jit(self._log_likelihoods)

  def _log_likelihoods(self, params: Params, batch: Mapping[str, jax.Array]):
    self.trace_count += 1  # Runs at trace time only.
    num_choices = batch["choice_mask"].shape[1]
    logits = self.model.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        decoder_segment_ids=batch["decoder_segment_ids"],
        decoder_positions=batch["decoder_positions"],
        enable_dropout=False)  # [B, L_dec, V]
    targets = batch["decoder_target_tokens"]
    per_token = token_log_probs(logits, targets)
    sums = segment_sums(per_token, batch["decoder_segment_ids"], num_choices)  # [B, C]
    lengths = segment_sums((targets > 0).astype(jnp.float32),
                           batch["decoder_segment_ids"], num_choices)  # [B, C]
    return sums, lengths

  def log_likelihoods(self, params: Params, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Returns (sum of token log-probs, number of target tokens), each `[B, C]`."""
    inputs = {k: batch[k] for k in _MODEL_KEYS}
    sums, lengths = self._jitted(params, inputs)
    return np.asarray(sums), np.asarray(lengths)

  def __call__(self, params: Params, batch: Batch) -> np.ndarray:
    """Returns normalized scores `[B, C]`, -inf for choices that are not real."""
    sums, lengths = self.log_likelihoods(params, batch)
    scores = np.asarray(normalize_scores(sums, lengths, self.scoring))
    return np.where(batch["choice_mask"], scores, -np.inf)


_MODEL_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
               "decoder_segment_ids", "decoder_positions", "choice_mask")


def unpack_choices(batch: Batch) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Splits a packed scoring batch into one decoder row per (example, choice).

  Returns the unpacked features (encoder input repeated per choice, each row
  0-padded to the longest choice) and the `[rows, 2]` (example row, choice)
  index of each row.
  """
  rows = []
  where = []
  segment_ids = batch["decoder_segment_ids"]
  for b, c in zip(*np.nonzero(batch["choice_mask"])):
    positions = np.nonzero(segment_ids[b] == c + 1)[0]
    rows.append((batch["encoder_input_tokens"][b], batch["decoder_input_tokens"][b, positions],
                 batch["decoder_target_tokens"][b, positions]))
    where.append((b, c))
  width = max(len(r[1]) for r in rows)
  decoder_inputs = np.zeros((len(rows), width), np.int32)
  decoder_targets = np.zeros((len(rows), width), np.int32)
  for i, (_, inp, tgt) in enumerate(rows):
    decoder_inputs[i, :len(inp)] = inp
    decoder_targets[i, :len(tgt)] = tgt
  unpacked = {"encoder_input_tokens": np.stack([r[0] for r in rows]),
              "decoder_input_tokens": decoder_inputs,
              "decoder_target_tokens": decoder_targets}
  return unpacked, np.asarray(where, np.int32).reshape(-1, 2)


def naive_log_likelihoods(model: t5.T5, params: Params, batch: Batch, *,
                          rows_per_call: int | None = None,
                          apply_fn: Callable | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Reference scorer: one full forward pass per choice, no sharing.

  Args:
    model: the T5 module.
    params: its parameters.
    batch: a packed scoring batch (the layout `ChoiceScorer` takes).
    rows_per_call: (example, choice) rows per forward call; all at once if None.
    apply_fn: a jitted `fn(params, enc, dec_in, dec_tgt) -> logits` to reuse
      across calls; built here if None.

  Returns:
    (sums, lengths), each `[B, C]`; entries of choices that are not real are 0.
  """
  if apply_fn is None:
    apply_fn = jax.jit(lambda p, e, d, t: model.apply({"params": p}, e, d, t))
  unpacked, where = unpack_choices(batch)
  num_rows = len(where)
  step = rows_per_call or num_rows
  sums = np.zeros(batch["choice_mask"].shape, np.float32)
  lengths = np.zeros(batch["choice_mask"].shape, np.float32)
  for start in range(0, num_rows, step):
    sl = slice(start, start + step)
    targets = unpacked["decoder_target_tokens"][sl]
    logits = apply_fn(params, unpacked["encoder_input_tokens"][sl],
                      unpacked["decoder_input_tokens"][sl], targets)  # [rows, L, V]
    per_token = np.asarray(token_log_probs(logits, jnp.asarray(targets)))
    for (b, c), row_logp, row_tgt in zip(where[sl], per_token, targets):
      sums[b, c] = row_logp.sum()
      lengths[b, c] = (row_tgt > 0).sum()
  return sums, lengths


# ---------------------------------------------------------------------------
# Examples to records.


def check_choices(example: Mapping[str, Any], *, task_name: str, position: int) -> None:
  """Raises ScoringError when an example has no answer choices or a bad is_correct."""
  choices = example.get("answer_choices")
  idx = example.get("idx", position)
  if choices is None or len(choices) == 0:
    raise ScoringError(
        f"Task {task_name!r}, example idx={int(idx)}: answer_choices is empty, so it "
        "cannot be rank-classified. Fix the Task's preprocessing or drop the example.")
  is_correct = np.asarray(example.get("is_correct", ()), bool)
  if is_correct.shape != (len(choices),):
    raise ScoringError(
        f"Task {task_name!r}, example idx={int(idx)}: is_correct has shape "
        f"{is_correct.shape} but there are {len(choices)} answer choices.")


def _records_from_batch(batch: Batch, scores: np.ndarray, *, task_name: str
                        ) -> Iterator[dict[str, Any]]:
  prediction = predict(scores, batch["choice_mask"])
  # `idx` is the example's index in its split; batches without it use example_index.
  indices = batch.get("idx", batch["example_index"])
  for row, example_index in enumerate(batch["example_index"]):
    if example_index < 0:
      continue  # A padding row.
    num_choices = int(batch["choice_mask"][row].sum())
    correct = np.nonzero(batch["is_correct"][row, :num_choices])[0]
    predicted = int(prediction[row])
    yield {
        "task": task_name,
        "idx": int(indices[row]),
        "scores": [float(s) for s in scores[row, :num_choices]],
        "prediction": predicted,
        "correct_choices": [int(c) for c in correct],
        "is_correct": bool(batch["is_correct"][row, predicted]),
    }


def score_batches(batches: Iterable[Batch], *, scorer: ChoiceScorer, params: Params,
                  task_name: str = "") -> list[dict[str, Any]]:
  """Scores packed batches; returns one record per real example, in batch order.

  Each record has `task`, `idx`, `scores` (one per choice), `prediction` (choice
  index), `correct_choices` (indices) and `is_correct`.
  """
  records: list[dict[str, Any]] = []
  for batch in batches:
    scores = scorer(params, batch)
    records.extend(_records_from_batch(batch, scores, task_name=task_name))
  return records


def make_batches(examples: Iterable[Mapping[str, Any]], *, vocabulary, batch_size: int,
                 task_name: str = "") -> Iterator[dict[str, np.ndarray]]:
  """Packs scoring examples into bucketed batches with the data package's batcher."""
  from elm_jax.data import feature_converters  # pylint: disable=g-import-not-at-top

  def checked() -> Iterator[Mapping[str, Any]]:
    for position, example in enumerate(examples):
      check_choices(example, task_name=task_name, position=position)
      yield example

  return feature_converters.make_scoring_batches(checked(), vocabulary, batch_size,
                                                 task_name=task_name or "<unnamed task>")


def score_examples(examples: Iterable[Mapping[str, Any]], *, model: t5.T5, params: Params,
                   vocabulary, batch_size: int, task_name: str = "",
                   scorer: ChoiceScorer | None = None,
                   scoring: ScoringConfig = ScoringConfig()) -> list[dict[str, Any]]:
  """Rank-classifies `_score_eval` examples (tokenized `inputs`, `answer_choices`,
  `is_correct`, `idx`); returns per-example records (see `score_batches`).

  Pass a `scorer` to reuse its compilations across calls (for example, across
  experts); otherwise one is built for `model` and `scoring`.
  """
  if scorer is None:
    scorer = ChoiceScorer(model, scoring=scoring)
  batches = make_batches(examples, vocabulary=vocabulary, batch_size=batch_size,
                         task_name=task_name)
  return score_batches(batches, scorer=scorer, params=params, task_name=task_name)


# Modules whose import (and `register()`, when they have one) registers Tasks.
DEFAULT_TASK_MODULES = ("elm_jax.tasks.bigbench", "elm_jax.tasks.t0")


def _get_provider(name: str, task_modules: Sequence[str] = DEFAULT_TASK_MODULES):
  """Returns the registered Task or Mixture `name`, importing `task_modules` if needed."""
  import importlib  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top

  def registered() -> bool:
    return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()

  for module_name in task_modules:
    if registered():
      break
    module = importlib.import_module(module_name)
    register = getattr(module, "register", None)
    if not registered() and callable(register):
      try:
        register()
      except Exception as e:  # pylint: disable=broad-except
        # A collection whose data is absent (for example P3) must not hide the others.
        logging.warning("%s.register() failed: %s", module_name, e)
  if not registered():
    import difflib  # pylint: disable=g-import-not-at-top
    names = [*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()]
    close = difflib.get_close_matches(name, names, n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"No seqio Task or Mixture is registered as {name!r} (after importing "
                     f"{', '.join(task_modules)}).{hint}")
  return seqio.get_mixture_or_task(name)


def resolve_task_names(mixture_or_task_name: str, *,
                       task_modules: Sequence[str] = DEFAULT_TASK_MODULES) -> list[str]:
  """Returns the Task names of a Task (itself) or of a Mixture (its leaf Tasks, sorted)."""
  import seqio  # pylint: disable=g-import-not-at-top
  provider = _get_provider(mixture_or_task_name, task_modules)
  if isinstance(provider, seqio.Mixture):
    return sorted(task.name for task in provider.tasks)
  return [provider.name]


def task_vocabulary(task_name: str):
  """Returns the vocabulary of a Task's `targets` feature (used for answer choices)."""
  return _get_provider(task_name).output_features["targets"].vocabulary


def task_examples(task_name: str, *, split: str, max_examples: int | None = None
                  ) -> Iterator[dict[str, Any]]:
  """Yields the numpy examples of a registered seqio Task split, unshuffled."""
  provider = _get_provider(task_name)
  dataset = provider.get_dataset(sequence_length=None, split=split, shuffle=False,
                                 num_epochs=1, use_cached=False)
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  for example in dataset.as_numpy_iterator():
    yield _decode_strings(example)


def _decode_strings(example: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in example.items():
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    elif isinstance(value, np.ndarray) and value.dtype == object:
      value = [v.decode("utf-8") if isinstance(v, bytes) else v for v in value.tolist()]
    out[key] = value
  return out


def evaluate_task(task_name: str, *, model: t5.T5, params: Params, vocabulary,
                  batch_size: int, split: str = "validation",
                  max_examples: int | None = None, scorer: ChoiceScorer | None = None,
                  scoring: ScoringConfig = ScoringConfig()) -> list[dict[str, Any]]:
  """Rank-classifies one `_score_eval` Task; returns its per-example records."""
  examples = task_examples(task_name, split=split, max_examples=max_examples)
  records = score_examples(examples, model=model, params=params, vocabulary=vocabulary,
                           batch_size=batch_size, task_name=task_name, scorer=scorer,
                           scoring=scoring)
  if not records:
    logging.warning("Task %s split %s has no examples.", task_name, split)
  return records

"""The training loop: steps, metrics, validation, checkpoints and preemption.

Step metrics are fetched one step late, so the host prepares the next batch
while the device computes; before any checkpoint the pending metrics are checked,
so a NaN or Inf loss never reaches a saved checkpoint.
"""

import dataclasses
from typing import Any, Callable

from absl import logging
from clu import metric_writers
import jax
import numpy as np
import seqio

from elm_jax import partitioning
from elm_jax.models import t5
from elm_jax.training import checkpointing
from elm_jax.training import input_pipeline
from elm_jax.training import metrics as metrics_lib
from elm_jax.training import preemption
from elm_jax.training import sharding as sharding_lib
from elm_jax.training import train_state as train_state_lib


@dataclasses.dataclass
class Outcome:
  """The end of a loop run."""
  state: train_state_lib.TrainState
  final_step: int
  losses: list[tuple[int, float]]
  eval_history: list[tuple[int, dict[str, float]]]
  stopped_by_preemption: bool
  checkpointer: checkpointing.Checkpointer
  best: tuple[int, dict[str, float]] | None

  def export_params(self, source: str) -> Any:
    """Host parameters of the best checkpoint or of the last state."""
    if source == "best" and self.best is not None:
      logging.info("Exporting the best parameters (step %d).", self.best[0])
      return sharding_lib.to_host(self.checkpointer.restore_best_params(self.state.params))
    return sharding_lib.to_host(self.state.params)

  def export_metrics(self, source: str) -> dict[str, float]:
    if source == "best" and self.best is not None:
      return dict(self.best[1])
    return dict(self.eval_history[-1][1]) if self.eval_history else {}


class Loop:
  """Runs the jitted step from a state to `total_steps`."""

  def __init__(self, *, step_fn: Callable[..., Any], eval_fn: Callable[..., Any],
               model: t5.T5, state_shardings: train_state_lib.TrainState,
               mesh: jax.sharding.Mesh, rules: Any, provider: seqio.DatasetProviderBase,
               spec: input_pipeline.DataSpec, converter: seqio.FeatureConverter,
               checkpointer: checkpointing.Checkpointer,
               checkpoint_config: checkpointing.CheckpointConfig, evaluation: Any,
               writer: metric_writers.MetricWriter,
               logging_config: metrics_lib.LoggingConfig, model_dir: str,
               base_fingerprint: str, num_params: int,
               batch_transform: input_pipeline.BatchTransform | None):
    self._model = model
    self._mesh = mesh
    self._rules = rules
    self._provider = provider
    self._spec = spec
    self._converter = converter
    self._checkpointer = checkpointer
    self._checkpoint_config = checkpoint_config
    self._evaluation = evaluation
    self._writer = writer
    self._logging_config = logging_config
    self._model_dir = model_dir
    self._base_fingerprint = base_fingerprint
    self._num_params = num_params
    self._batch_transform = batch_transform
    self._batch_sharding = partitioning.data_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._step = jax.jit(step_fn, in_shardings=(state_shardings, self._batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    self._eval = jax.jit(eval_fn, in_shardings=(None, self._batch_sharding),
                         out_shardings=replicated)
    self._last_saved: int | None = checkpointer.latest_step()
    self._scorer = None

  # Checkpoints -------------------------------------------------------------------

  def _data_state(self, position: int) -> dict[str, Any]:
    return {"batches_consumed": position, "data_spec": self._spec.to_json(),
            "base_fingerprint": self._base_fingerprint}

  def _save(self, state, position: int, *, force: bool = False) -> None:
    if self._checkpointer.save(state, data_state=self._data_state(position), force=force):
      self._last_saved = int(jax.device_get(state.step))

  # Validation --------------------------------------------------------------------

  def _score_task(self) -> str | None:
    name = self._evaluation.score_task
    if name != "auto":
      return name
    candidate = f"{self._provider.name}_score_eval"
    try:
      seqio.get_mixture_or_task(candidate)
    except ValueError:
      return None
    return candidate

  def _validate(self, state, step: int) -> dict[str, float]:
    """Validation loss and, with a scoring Task, rank-classification accuracy."""
    results: dict[str, float] = {}
    ev = self._evaluation
    params = state.params
    if input_pipeline.has_split(self._provider, ev.split):
      batch_size = ev.batch_size or self._spec.global_batch_size
      totals: dict[str, float] = {}
      with partitioning.activate(self._mesh, self._rules):
        for batch in input_pipeline.eval_batches(
            self._provider, split=ev.split, feature_lengths=dict(self._spec.feature_lengths),
            feature_converter=self._converter, batch_size=batch_size,
            max_batches=ev.max_batches):
          sums = jax.device_get(self._eval(params, sharding_lib.global_batch(
              batch, self._batch_sharding)))
          for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
      if totals.get("weight_sum", 0.0) > 0:
        results["eval/loss"] = totals["loss_sum"] / totals["weight_sum"]
        results["eval/token_accuracy"] = totals["correct_sum"] / totals["weight_sum"]
    score_task = self._score_task()
    if score_task is not None:
      from elm_jax.evaluation import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
      if self._scorer is None:
        self._scorer = scorer_lib.ChoiceScorer(self._model)
      vocabulary = self._provider.output_features["targets"].vocabulary
      with partitioning.activate(self._mesh, self._rules):
        records = scorer_lib.evaluate_task(
            score_task, model=self._model, params=params, vocabulary=vocabulary,
            batch_size=ev.batch_size or self._spec.global_batch_size, split=ev.split,
            max_examples=ev.score_max_examples, scorer=self._scorer)
      if records:
        results["eval/accuracy"] = float(np.mean([r["is_correct"] for r in records]))
    if results:
      self._writer.write_scalars(step, results)
      logging.info("Validation at step %d: %s", step,
                   ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
    return results

  def _is_better(self, value: float, best: float | None) -> bool:
    if best is None:
      return True
    return value > best if self._checkpoint_config.best_mode == "max" else value < best

  # The loop ----------------------------------------------------------------------

  def run(self, state, *, total_steps: int, data_position: int) -> Outcome:
    start_step = int(jax.device_get(state.step))
    config = self._checkpoint_config
    eval_period = self._evaluation.period
    best = self._checkpointer.best_record()
    losses: list[tuple[int, float]] = []
    eval_history: list[tuple[int, dict[str, float]]] = []
    tokens_per_step = self._spec.global_batch_size * sum(dict(self._spec.feature_lengths).values())
    reporter = metrics_lib.StepReporter(
        writer=self._writer, config=self._logging_config, total_steps=total_steps,
        start_step=start_step, tokens_per_step=tokens_per_step, num_params=self._num_params)
    dataset = input_pipeline.train_dataset(
        self._provider, spec=self._spec, feature_converter=self._converter,
        process_index=jax.process_index(), process_count=jax.process_count(),
        skip_batches=data_position)
    batches = input_pipeline.BatchIterator(dataset, start_position=data_position,
                                           transform=self._batch_transform)
    pending: list[tuple[int, Any]] = []

    def flush() -> None:
      while pending:
        done_step, device_metrics = pending.pop(0)
        host = metrics_lib.host_metrics(device_metrics)
        metrics_lib.check_finite(done_step, host, last_checkpoint=self._last_saved,
                                 model_dir=self._model_dir)
        losses.append((done_step, host["loss"]))
        reporter.record(done_step, host)

    if start_step >= total_steps:
      logging.info("Already at step %d of %d: nothing to train.", start_step, total_steps)
    else:
      logging.info("Training from step %d to %d (data position %d).", start_step,
                   total_steps, data_position)
    stopped = False
    step = start_step
    try:
      with preemption.PreemptionWatcher() as watcher, \
          partitioning.activate(self._mesh, self._rules):
        while step < total_steps:
          batch = sharding_lib.global_batch(next(batches), self._batch_sharding)
          state, device_metrics = self._step(state, batch)
          step += 1
          # Keep one step in flight: check the previous step's metrics now.
          flush()
          pending.append((step, device_metrics))

          preempted = watcher.should_stop(step)
          is_last = step == total_steps
          save_now = (config.period > 0 and step % config.period == 0) or preempted or is_last
          validate_now = eval_period >= 0 and (
              is_last or (eval_period > 0 and step % eval_period == 0))
          if save_now or validate_now:
            flush()
            reporter.pause()
          if validate_now:
            results = self._validate(state, step)
            eval_history.append((step, results))
            metric = config.best_metric
            if metric is not None and metric in results and self._is_better(
                results[metric], best[1][metric] if best else None):
              self._checkpointer.save_best(state, results)
              best = (step, dict(results))
          if save_now:
            self._save(state, batches.position, force=preempted or is_last)
          if save_now or validate_now:
            reporter.resume()
          if preempted:
            logging.warning("Preemption signal: saved step %d and stopping.", step)
            stopped = True
            break
        flush()
    except metrics_lib.NonFiniteLossError:
      self._checkpointer.wait_until_finished()
      raise
    finally:
      reporter.close()
    self._checkpointer.wait_until_finished()
    logging.info("Training stopped at step %d%s.", step,
                 " (preempted)" if stopped else "")
    return Outcome(state=state, final_step=step, losses=losses, eval_history=eval_history,
                   stopped_by_preemption=stopped, checkpointer=self._checkpointer, best=best)

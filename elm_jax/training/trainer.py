"""`train()`: fine-tune or pretrain T5 on a seqio Task or Mixture, and export an expert.

The function takes every collaborator as a keyword argument and runs without
gin; `elm_jax.train` binds it from gin files. Its steps, in order: data, model
and parameters, partitioning, checkpoint restore, the loop (with validation,
checkpoints and preemption), the expert export.
"""

import dataclasses
import inspect
import math
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
from clu import metric_writers
import jax
import optax
import seqio

from elm_jax import file_io
from elm_jax.models import t5
from elm_jax.training import checkpointing
from elm_jax.training import export as export_lib
from elm_jax.training import input_pipeline
from elm_jax.training import loop as loop_lib
from elm_jax.training import metrics as metrics_lib
from elm_jax.training import optimizers
from elm_jax.training import sharding as sharding_lib
from elm_jax.training import state_init
from elm_jax.training import train_step as train_step_lib

LearningRate = float | Callable[..., optax.Schedule]
OptimizerFactory = Callable[..., optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Periodic validation.

  Attributes:
    period: validate every `period` steps and at the end (0: only at the end;
      -1: never).
    split: the validation split.
    max_batches: at most this many batches for the validation loss (None: all).
    batch_size: validation batch size (None: the training batch size).
    score_task: a `_score_eval` Task or Mixture for rank-classification accuracy
      (`eval/accuracy`). "auto" uses `<task>_score_eval` when it is registered;
      None disables scoring.
    score_max_examples: at most this many examples scored per validation.
  """
  period: int = 0
  split: str = "validation"
  max_batches: int | None = 20
  batch_size: int | None = None
  score_task: str | None = "auto"
  score_max_examples: int | None = 200


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """The outcome of a run: its output folders, steps, losses and validation results."""
  model_dir: str
  final_step: int
  train_steps: int
  losses: tuple[tuple[int, float], ...]     # (step, loss) of the steps this call ran
  eval_history: tuple[tuple[int, dict[str, float]], ...]
  expert_dir: str | None
  stopped_by_preemption: bool
  train_seconds: float


def _make_schedule(learning_rate: LearningRate, total_steps: int) -> optax.Schedule:
  """A float becomes a constant; a factory is called with total_steps when it takes it."""
  if isinstance(learning_rate, (int, float)):
    return optimizers.constant(float(learning_rate))
  try:
    parameters = inspect.signature(learning_rate).parameters
  except (TypeError, ValueError):
    parameters = {}
  if "total_steps" in parameters:
    return learning_rate(total_steps=total_steps)
  return learning_rate()


def _make_optimizer(optimizer: OptimizerFactory | optax.GradientTransformation,
                    schedule: optax.Schedule, clip_norm: float | None
                    ) -> optax.GradientTransformation:
  if isinstance(optimizer, optax.GradientTransformation):
    base = optimizer
  else:
    base = optimizer(learning_rate=schedule)
  return optimizers.make_optimizer(base, clip_norm=clip_norm)


def train(*,
          model_config: t5.T5Config,
          task_name: str | seqio.DatasetProviderBase,
          feature_lengths: Mapping[str, int],
          model_dir: str,
          batch_size: int,
          optimizer: OptimizerFactory | optax.GradientTransformation,
          learning_rate: LearningRate = 1e-3,
          train_steps: int | None = None,
          epochs: float | None = None,
          trainable: str = "full",
          train_layer_norms: bool | None = None,
          clip_norm: float | None = None,
          num_microbatches: int = 1,
          loss: train_step_lib.LossConfig = train_step_lib.LossConfig(),
          split: str = "train",
          packing: bool | str = False,
          feature_converter: seqio.FeatureConverter | None = None,
          initial_checkpoint_path: str | None = None,
          mesh: sharding_lib.MeshConfig = sharding_lib.MeshConfig(),
          checkpoint: checkpointing.CheckpointConfig = checkpointing.CheckpointConfig(),
          evaluation: EvalConfig = EvalConfig(),
          expert: export_lib.ExpertSettings | None = export_lib.ExpertSettings(),
          logging_config: metrics_lib.LoggingConfig = metrics_lib.LoggingConfig(),
          seed: int = 0,
          batch_transform: input_pipeline.BatchTransform | None = None,
          config_text: str | None = None,
          dry_run: bool = False) -> TrainResult | None:
  """Train T5 on a Task or Mixture; resume from `model_dir` when it has checkpoints.

  Args:
    model_config: the model; adapters or LoRA come from its `adapter`/`lora`.
    task_name: a registered Task or Mixture name, or the provider itself.
    feature_lengths: {"inputs": n, "targets": m}.
    model_dir: checkpoints, TensorBoard logs, config.gin and the expert go here.
    batch_size: global batch size (rows; packed rows with `packing`).
    optimizer: a factory called as `optimizer(learning_rate=schedule)`, such as
      `optimizers.adamw` with its other arguments bound, or a ready optax
      transformation (then `learning_rate` only feeds the logged rate).
    learning_rate: a float (constant) or a schedule factory such as
      `optimizers.linear_decay`, called with `total_steps=` when it takes it.
    train_steps: optimizer updates to reach; exactly one of this and `epochs`.
    epochs: passes over the split (see `input_pipeline.batches_per_epoch`).
    trainable: "full", "adapter" or "lora" (`optimizers.trainable_mask`).
    train_layer_norms: passed to `trainable_mask` (None: the mode's default).
    clip_norm: global gradient-norm clipping, or None.
    num_microbatches: gradient accumulation inside the step.
    loss: label smoothing and z-loss.
    split: the training split.
    packing: pack several examples per row: True or "first_fit" packs first-fit
      decreasing over windows of 1000 examples (about 93% full on BIG-bench),
      "seqio" uses seqio's packer (about 75%), False one example per row.
    feature_converter: overrides the converter chosen by `packing`.
    initial_checkpoint_path: a Hugging Face, T5X or elm-jax model directory to
      start from; None starts from random parameters (seeded by `seed`).
    mesh: the device mesh and logical axis rules.
    checkpoint: checkpoint period, retention, best-checkpoint selection.
    evaluation: periodic validation.
    expert: what to write into `<model_dir>/expert/`; None writes no expert.
    logging_config: step log rate, TensorBoard period, MFU peak.
    seed: seeds initialization, data order and dropout.
    batch_transform: `fn(batch_number, batch) -> batch` applied to each host
      batch (1-based number in the data stream); a hook for tests and debugging.
    config_text: the resolved gin config, written to config.gin, TensorBoard and
      the expert's metadata.
    dry_run: check the arguments and the data, then return None without training.

  Returns:
    A `TrainResult`, or None for a dry run.

  Raises:
    metrics.NonFiniteLossError: the loss became NaN or Inf.
  """
  started = time.time()
  if (train_steps is None) == (epochs is None):
    raise ValueError(f"Set exactly one of train_steps ({train_steps}) and epochs ({epochs}).")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  if set(feature_lengths) != {"inputs", "targets"}:
    raise ValueError(f"feature_lengths must have keys 'inputs' and 'targets', got "
                     f"{sorted(feature_lengths)}.")
  if trainable not in optimizers.MODES:
    raise ValueError(f"trainable={trainable!r} is not one of {optimizers.MODES}.")
  model_dir = os.path.abspath(model_dir)

  # Data.
  provider = input_pipeline.get_provider(task_name)
  packing = input_pipeline.packer_name(packing)
  converter = feature_converter or input_pipeline.make_feature_converter(packing, seed)
  spec = input_pipeline.DataSpec(
      provider_name=provider.name, split=split,
      feature_lengths=tuple(sorted(feature_lengths.items())),
      global_batch_size=batch_size, seed=seed, packing=packing)
  if train_steps is None:
    per_epoch = input_pipeline.batches_per_epoch(provider, spec=spec, feature_converter=converter)
    train_steps = max(1, math.ceil(epochs * per_epoch))
    logging.info("%s epochs of %d batches: %d train steps.", epochs, per_epoch, train_steps)
  if dry_run:
    _ = next(iter(input_pipeline.train_dataset(
        provider, spec=spec, feature_converter=converter, process_index=0,
        process_count=1).take(1)))
    _make_optimizer(optimizer, _make_schedule(learning_rate, train_steps), clip_norm)
    logging.info("Dry run: the configuration of %s is valid (%d steps).", provider.name,
                 train_steps)
    return None
  logging.info("Training %s (%s split) for %d steps, batch %d, lengths %s, trainable=%s.",
               provider.name, split, train_steps, batch_size, dict(feature_lengths), trainable)
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    checkpointing.write_model_config(model_dir, model_config)
    if config_text is not None:
      file_io.write_text_atomic(os.path.join(model_dir, "config.gin"), config_text)

  # Model, optimizer and partitioning.
  device_mesh = mesh.build()
  rules = mesh.axis_rules
  data_ways = device_mesh.shape["data"]
  if batch_size % data_ways or num_microbatches < 1 or (batch_size // num_microbatches) % data_ways:
    raise ValueError(
        f"batch_size={batch_size} with num_microbatches={num_microbatches} does not split "
        f"over the {data_ways}-way data axis of the mesh: each microbatch needs a "
        f"multiple of {data_ways} rows. Change batch_size or the mesh (MESH_DATA).")
  logging.info("Mesh %s over %d devices in %d processes.", dict(device_mesh.shape),
               device_mesh.size, jax.process_count())
  schedule = _make_schedule(learning_rate, train_steps)
  tx = _make_optimizer(optimizer, schedule, clip_norm)
  model = t5.T5(model_config)
  setup = state_init.initialize(
      model_config=model_config, optimizer=tx, mesh=device_mesh, rules=rules,
      trainable=trainable, train_layer_norms=train_layer_norms, seed=seed,
      initial_checkpoint_path=initial_checkpoint_path)

  # Checkpoint restore.
  checkpointer = checkpointing.Checkpointer(model_dir, checkpoint)
  state, data_position = setup.state, 0
  latest = checkpointer.latest_step()
  if latest is not None:
    state, data_state = checkpointer.restore(setup.state, latest)
    data_position = int(data_state["batches_consumed"])
    _check_resume(data_state, spec, setup.base_fingerprint, checkpointer.directory)

  # The loop.
  writer = metric_writers.create_default_writer(
      os.path.join(model_dir, "tensorboard"), just_logging=jax.process_index() > 0)
  if config_text is not None and latest is None:
    writer.write_texts(0, {"config": "\n".join("    " + l for l in config_text.splitlines())})
  step_fn = train_step_lib.make_train_step(
      model=model, optimizer=tx, loss_config=loss, num_microbatches=num_microbatches,
      learning_rate_fn=schedule)
  eval_fn = train_step_lib.make_eval_step(model=model, loss_config=loss)
  runner = loop_lib.Loop(
      step_fn=step_fn, eval_fn=eval_fn, model=model, state_shardings=setup.state_shardings,
      mesh=device_mesh, rules=rules, provider=provider, spec=spec, converter=converter,
      checkpointer=checkpointer, checkpoint_config=checkpoint, evaluation=evaluation,
      writer=writer, logging_config=logging_config, model_dir=model_dir,
      base_fingerprint=setup.base_fingerprint, num_params=setup.num_params,
      batch_transform=batch_transform)
  expert_dir = None
  try:
    outcome = runner.run(state, total_steps=train_steps, data_position=data_position)

    # The expert.
    if expert is not None and not outcome.stopped_by_preemption:
      expert_dir = export_lib.export_expert(
          settings=expert, model_dir=model_dir, model_config=model_config,
          params=outcome.export_params(checkpoint.export_from), trainable_mask=setup.mask,
          trainable=trainable, task_name=provider.name,
          base_fingerprint=setup.base_fingerprint,
          data_hash=input_pipeline.data_hash(provider, spec=spec), steps=outcome.final_step,
          validation_metrics=outcome.export_metrics(checkpoint.export_from),
          config_text=config_text, train_seconds=time.time() - started)
  finally:
    checkpointer.close()
    writer.flush()
    writer.close()
  return TrainResult(
      model_dir=model_dir, final_step=outcome.final_step, train_steps=train_steps,
      losses=tuple(outcome.losses), eval_history=tuple(outcome.eval_history),
      expert_dir=expert_dir, stopped_by_preemption=outcome.stopped_by_preemption,
      train_seconds=time.time() - started)


def _check_resume(data_state: Mapping[str, Any], spec: input_pipeline.DataSpec,
                  base_fingerprint: str, directory: str) -> None:
  saved_spec = data_state.get("data_spec")
  if saved_spec is not None and saved_spec != spec.to_json():
    logging.warning("Resuming from %s with other data settings than the checkpoint's "
                    "(%s, now %s): the data stream will not continue exactly.",
                    directory, saved_spec, spec.to_json())
  saved_fingerprint = data_state.get("base_fingerprint")
  if saved_fingerprint is not None and saved_fingerprint != base_fingerprint:
    raise ValueError(
        f"The checkpoints in {directory} were trained from a base with fingerprint "
        f"{saved_fingerprint}, but the initial checkpoint now has fingerprint "
        f"{base_fingerprint}. Use the original INITIAL_CHECKPOINT_PATH or a new model_dir.")

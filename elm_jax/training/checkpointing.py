"""Orbax checkpoints of the train state, and model directories as initial checkpoints.

Layout of a model directory:

  <model_dir>/config.gin              the resolved gin config
  <model_dir>/model_config.json       the T5Config as a dict
  <model_dir>/checkpoints/<step>/     one orbax checkpoint per saved step, items:
      trainable/    the trainable parameters (nested dict)
      frozen/       the frozen parameters (absent for full fine-tuning, or when
                    `save_frozen=False`: they are then re-read from the initial
                    checkpoint and checked against `base_fingerprint`)
      train_state/  {"step", "rng", "opt_state": {"000000": leaf, ...}}, the
                    optimizer state as its flattened leaves in tree order
      data_state/   JSON: batches consumed, the data settings, the base fingerprint
  <model_dir>/best/<step>/            the parameters of the best validation result
  <model_dir>/expert/                 the exported expert

Importing this module registers the "orbax" format with
`elm_jax.checkpoints.loading`, so a trained model directory (or one of its step
folders) works as `INITIAL_CHECKPOINT_PATH`.
"""

import dataclasses
import json
import os
import re
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from elm_jax import file_io
from elm_jax.checkpoints import loading
from elm_jax.models import t5
from elm_jax.training import train_state as train_state_lib

MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and how the trainer writes checkpoints.

  Attributes:
    period: save every `period` steps (0 disables periodic saves; the final and
      the SIGTERM saves still happen).
    keep: how many of the latest checkpoints to keep.
    async_save: write in a background thread while training continues.
    save_frozen: also store the frozen parameters (set False for adapter or LoRA
      training on a large base to store only what changes).
    best_metric: the validation metric that selects the best checkpoint, e.g.
      "eval/accuracy" or "eval/loss"; None keeps no best checkpoint.
    best_mode: "max" or "min".
    export_from: "best" or "last": which parameters become the expert.
  """
  period: int = 1000
  keep: int = 3
  async_save: bool = True
  save_frozen: bool = True
  best_metric: str | None = None
  best_mode: str = "max"
  export_from: str = "last"

  def __post_init__(self):
    if self.period < 0 or self.keep < 1:
      raise ValueError(f"CheckpointConfig needs period >= 0 and keep >= 1, got "
                       f"period={self.period}, keep={self.keep}.")
    if self.best_mode not in ("max", "min"):
      raise ValueError(f"CheckpointConfig.best_mode must be 'max' or 'min', got "
                       f"{self.best_mode!r}.")
    if self.export_from not in ("best", "last"):
      raise ValueError(f"CheckpointConfig.export_from must be 'best' or 'last', got "
                       f"{self.export_from!r}.")
    if self.export_from == "best" and self.best_metric is None:
      raise ValueError("CheckpointConfig.export_from='best' needs best_metric, e.g. "
                       "'eval/accuracy'.")


def _flatten_opt_state(opt_state: Any) -> dict[str, Any]:
  return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))}


def _unflatten_opt_state(template: Any, flat: Mapping[str, Any]) -> Any:
  treedef = jax.tree.structure(template)
  leaves = [flat[f"{i:06d}"] for i in range(treedef.num_leaves)]
  return jax.tree.unflatten(treedef, leaves)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Saves and restores `TrainState` plus the data position in `<model_dir>/checkpoints`."""

  def __init__(self, model_dir: str, config: CheckpointConfig):
    self._model_dir = os.path.abspath(model_dir)
    self._config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep,
        enable_async_checkpointing=config.async_save,
        create=True)
    self._manager = ocp.CheckpointManager(
        os.path.join(self._model_dir, CHECKPOINTS_DIR), options=options)
    self._best_manager = None
    if config.best_metric is not None:
      best_options = ocp.CheckpointManagerOptions(
          max_to_keep=1, enable_async_checkpointing=False, create=True)
      self._best_manager = ocp.CheckpointManager(
          os.path.join(self._model_dir, BEST_DIR), options=best_options)

  @property
  def directory(self) -> str:
    return os.path.join(self._model_dir, CHECKPOINTS_DIR)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: train_state_lib.TrainState, *, data_state: Mapping[str, Any],
           force: bool = False) -> bool:
    """Save `state` at its step (asynchronously when configured)."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    items = {
        "trainable": ocp.args.StandardSave(state.trainable),
        "train_state": ocp.args.StandardSave({
            "step": state.step, "rng": state.rng,
            "opt_state": _flatten_opt_state(state.opt_state)}),
        "data_state": ocp.args.JsonSave(dict(data_state)),
    }
    if self._config.save_frozen and jax.tree.leaves(state.frozen):
      items["frozen"] = ocp.args.StandardSave(state.frozen)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Checkpoint of step %d %s to %s.", step,
                   "being written" if self._config.async_save else "written",
                   self.directory)
    return saved

  def restore(self, template: train_state_lib.TrainState, step: int | None = None
              ) -> tuple[train_state_lib.TrainState, dict[str, Any]]:
    """Restore the state at `step` (default the latest) into `template`'s shardings.

    `template` is a state with the right structure, shapes and shardings (the
    freshly initialized one); its frozen parameters are kept when the checkpoint
    has none.
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    metadata = self._manager.item_metadata(step)
    has_frozen = metadata is not None and "frozen" in metadata and metadata["frozen"] is not None
    items = {
        "trainable": ocp.args.StandardRestore(_abstract(template.trainable)),
        "train_state": ocp.args.StandardRestore({
            "step": _abstract(template.step), "rng": _abstract(template.rng),
            "opt_state": _abstract(_flatten_opt_state(template.opt_state))}),
        "data_state": ocp.args.JsonRestore(),
    }
    if has_frozen:
      items["frozen"] = ocp.args.StandardRestore(_abstract(template.frozen))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    extra = restored["train_state"]
    state = train_state_lib.TrainState(
        step=extra["step"],
        trainable=restored["trainable"],
        frozen=restored["frozen"] if has_frozen else template.frozen,
        opt_state=_unflatten_opt_state(template.opt_state, extra["opt_state"]),
        rng=extra["rng"])
    logging.info("Restored the train state of step %d from %s.", step, self.directory)
    return state, dict(restored["data_state"])

  def save_best(self, state: train_state_lib.TrainState, metrics: Mapping[str, float]) -> None:
    """Replace the best checkpoint with the parameters of `state`."""
    if self._best_manager is None:
      return
    step = int(jax.device_get(state.step))
    params = {"params": ocp.args.StandardSave(state.params),
              "metrics": ocp.args.JsonSave({k: float(v) for k, v in metrics.items()})}
    self._best_manager.save(step, args=ocp.args.Composite(**params), force=True)
    self._best_manager.wait_until_finished()
    logging.info("New best %s = %.4f at step %d.", self._config.best_metric,
                 metrics[self._config.best_metric], step)

  def best_record(self) -> tuple[int, dict[str, float]] | None:
    """(step, metrics) of the best checkpoint, or None."""
    if self._best_manager is None or self._best_manager.latest_step() is None:
      return None
    step = self._best_manager.latest_step()
    restored = self._best_manager.restore(
        step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
    return step, dict(restored["metrics"])

  def restore_best_params(self, template_params: Any) -> Any:
    step = self._best_manager.latest_step()
    restored = self._best_manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(template_params))))
    return restored["params"]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._best_manager is not None:
      self._best_manager.close()


def write_model_config(model_dir: str, config: t5.T5Config) -> None:
  """Write `model_config.json` (process 0 only; atomic)."""
  if jax.process_index() != 0:
    return
  file_io.write_text_atomic(os.path.join(model_dir, MODEL_CONFIG_FILE),
                            json.dumps(config.to_dict(), indent=2, sort_keys=True))


# Model directories as initial checkpoints ----------------------------------------

_STEP_DIR = re.compile(r"^\d+$")


def _resolve_step_dir(path: str) -> tuple[str, str] | None:
  """(model_dir, step_dir) for a model dir or one of its checkpoint step folders."""
  path = os.path.abspath(path)
  candidates = []
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    ckpt_dir = os.path.join(path, CHECKPOINTS_DIR)
    steps = sorted(int(n) for n in os.listdir(ckpt_dir)
                   if _STEP_DIR.match(n) and os.path.isdir(os.path.join(ckpt_dir, n, "trainable")))
    if steps:
      candidates.append((path, os.path.join(ckpt_dir, str(steps[-1]))))
  elif _STEP_DIR.match(os.path.basename(path)) and os.path.isdir(os.path.join(path, "trainable")):
    candidates.append((os.path.dirname(os.path.dirname(path)), path))
  return candidates[0] if candidates else None


def is_orbax_model_dir(path: str) -> bool:
  try:
    found = _resolve_step_dir(path)
  except OSError:
    return False
  return found is not None and os.path.isfile(os.path.join(found[0], MODEL_CONFIG_FILE))


def load_trained_params(path: str) -> tuple[t5.T5Config, dict[str, Any]]:
  """The saved config and all trained parameters (adapters and LoRA included).

  Raises:
    loading.CheckpointError: `path` has no checkpoint, or only the trainable
      parameters of an adapter or LoRA run saved with `save_frozen=False`.
  """
  found = _resolve_step_dir(path)
  if found is None:
    raise loading.CheckpointError(f"{path} has no checkpoints/<step>/trainable folder; pass a trained model directory.")
  model_dir, step_dir = found
  with open(os.path.join(model_dir, MODEL_CONFIG_FILE), encoding="utf-8") as f:
    saved_config = t5.T5Config.from_dict(json.load(f))
  params = _restore_on_host(os.path.join(step_dir, "trainable"))
  if os.path.isdir(os.path.join(step_dir, "frozen")):
    frozen = _restore_on_host(os.path.join(step_dir, "frozen"))
    params = train_state_lib.merge_params(params, frozen)
  elif saved_config.adapter is not None or saved_config.lora is not None:
    raise loading.CheckpointError(
        f"{step_dir} contains only the adapter or LoRA parameters (saved with "
        "save_frozen=False); load its base checkpoint and apply the expert instead.")
  return saved_config, params


def _restore_on_host(path: str) -> Any:
  """Restore a StandardSave item as numpy arrays, whatever mesh wrote it."""
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, "item_metadata", None)
  tree = metadata if tree is None else tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def _is_adapter_or_lora(name: str) -> bool:
  parts = tuple(name.split("/"))
  return any(p.endswith("_adapter") for p in parts) or parts[-1] in ("lora_a", "lora_b")


def load_orbax_model(path: str, config: t5.T5Config | None
                     ) -> tuple[t5.T5Config, dict[str, Any]]:
  """Load the base parameters (adapters and LoRA removed) of a trained model dir."""
  saved_config, params = load_trained_params(path)
  flat = loading.flatten_params(params)
  base = {name: value for name, value in flat.items() if not _is_adapter_or_lora(name)}
  params = loading.unflatten_params(base)
  base_saved = loading.base_config(saved_config)
  if config is None:
    return base_saved, params
  loading.check_same_architecture(config, base_saved, path)
  return config, params


if "orbax" not in loading.registered_loaders():
  loading.register_loader(
      "orbax", is_orbax_model_dir, load_orbax_model,
      description="an elm-jax model directory (model_config.json and "
      "checkpoints/<step>/trainable) or one of its step folders")

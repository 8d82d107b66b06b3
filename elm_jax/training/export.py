"""Write the trained parameters of a run as an expert (`<model_dir>/expert/`)."""

import dataclasses
import os
import re
from typing import Any, Mapping

from absl import logging
from flax import traverse_util
import jax

from elm_jax.checkpoints import experts
from elm_jax.models import t5

EXPERT_DIR = "expert"
KINDS = ("prompt", "dataset", "multitask")


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
  """The provenance written into expert.json.

  Attributes:
    kind: "prompt", "dataset" or "multitask".
    expert_id: the expert's id; None derives it from the Task or Mixture name.
    dataset: the training dataset's name (None: not recorded).
    prompt: the promptsource template's name (prompt experts).
  """
  kind: str = "prompt"
  expert_id: str | None = None
  dataset: str | None = None
  prompt: str | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"ExpertSettings.kind={self.kind!r} is not one of {KINDS}.")


def _default_id(task_name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", task_name) or "expert"


def export_expert(*, settings: ExpertSettings, model_dir: str, model_config: t5.T5Config,
                  params: Mapping[str, Any], trainable_mask: Mapping[str, Any],
                  trainable: str, task_name: str, base_fingerprint: str, data_hash: str,
                  steps: int, validation_metrics: Mapping[str, float],
                  config_text: str | None, train_seconds: float) -> str:
  """Save the trainable parameters (all of them for "full") with their metadata.

  Only process 0 writes; every process returns the folder's path.
  """
  directory = os.path.join(model_dir, EXPERT_DIR)
  if jax.process_index() != 0:
    return directory
  flat_params = traverse_util.flatten_dict(dict(params))
  flat_mask = traverse_util.flatten_dict(dict(trainable_mask))
  kept = traverse_util.unflatten_dict({k: v for k, v in flat_params.items() if flat_mask[k]})
  metadata = experts.ExpertMetadata(
      id=experts.validate_id(settings.expert_id or _default_id(task_name)),
      kind=settings.kind,
      base_fingerprint=base_fingerprint,
      trainable=trainable,
      task=task_name,
      dataset=settings.dataset,
      prompt=settings.prompt,
      model_config=model_config.to_dict(),
      adapter=dataclasses.asdict(model_config.adapter) if model_config.adapter else None,
      lora=dataclasses.asdict(model_config.lora) if model_config.lora else None,
      gin_config=config_text or "",
      steps=int(steps),
      data_hash=data_hash,
      validation_metrics={k: float(v) for k, v in validation_metrics.items()},
      train_seconds=float(train_seconds))
  experts.save_expert(directory, params=kept, metadata=metadata, overwrite=True)
  logging.info("Expert %s (%s, %d tensors) written to %s.", metadata.id, settings.kind,
               len(traverse_util.flatten_dict(kept)), directory)
  return directory

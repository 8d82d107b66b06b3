"""Loading the model an evaluation runs: a base checkpoint, optionally with an expert.

A base comes from any format `elm_jax.checkpoints.loading.load_model` reads (a
Hugging Face directory, a T5X checkpoint, an elm-jax model directory). An expert
folder (prompt, dataset, multitask or merged expert) is checked against the base
by fingerprint and applied onto it. Its `model_config` sets whether the model
has adapters or LoRA.
"""

from typing import Any

import numpy as np

from elm_jax.checkpoints import experts as experts_lib
from elm_jax.checkpoints import loading
from elm_jax.models import t5


def load_base(checkpoint_path: str) -> tuple[t5.T5Config, Any, dict[str, Any]]:
  """Loads a base checkpoint; returns (config, params, description for reports)."""
  from elm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top,unused-import
  # The import registers the loader of elm-jax model directories.
  config, params = loading.load_model(checkpoint_path)
  description = {"checkpoint": str(checkpoint_path),
                 "checkpoint_format": loading.detect_format(str(checkpoint_path))}
  return config, params, description


def apply_expert_folder(config: t5.T5Config, base_params: Any, expert_path: str, *,
                        base_fingerprint: str | None = None
                        ) -> tuple[t5.T5Config, Any, dict[str, Any]]:
  """Applies an expert folder onto base parameters.

  Args:
    config: the base's config.
    base_params: the base's parameters.
    expert_path: the expert folder.
    base_fingerprint: `experts.fingerprint(base_params)` when already known;
      hashing a large base for every expert is slow.

  Returns:
    (the expert's model config, its full parameters, description for reports).

  Raises:
    ExpertError: a corrupt expert, one of another base (fingerprints differ) or
      of another architecture, or one lacking adapter parameters its config needs.
  """
  if base_fingerprint is None:
    base_fingerprint = experts_lib.fingerprint(base_params)
  metadata, expert_params = experts_lib.load_expert(expert_path,
                                                    base_fingerprint=base_fingerprint)
  expert_config = config
  if metadata.model_config:
    expert_config = t5.T5Config.from_dict(metadata.model_config)
    loading.check_same_architecture(expert_config, config, str(expert_path))
  params = _add_missing_adapter_params(expert_config, base_params, expert_params,
                                       source=str(expert_path))
  params = experts_lib.apply_expert(params, expert_params)
  description = {"expert": str(expert_path), "expert_id": metadata.id,
                 "expert_kind": metadata.kind, "expert_task": metadata.task}
  return expert_config, params, description


def load_model_and_params(checkpoint_path: str, expert_path: str | None = None
                          ) -> tuple[t5.T5Config, Any, dict[str, Any]]:
  """Loads a base checkpoint and, when `expert_path` is given, applies the expert."""
  config, params, description = load_base(checkpoint_path)
  if expert_path is None:
    return config, params, description
  config, params, expert_description = apply_expert_folder(config, params, expert_path)
  return config, params, description | expert_description


def _add_missing_adapter_params(config: t5.T5Config, base_params: Any, expert_params: Any,
                                *, source: str) -> Any:
  """Gives the base tree the adapter or LoRA slots of `config`, filled from the expert.

  A base checkpoint has no adapter or LoRA parameters. Every one that `config`
  builds must come from the expert, because zeros would silently change the model.
  """
  expected = loading.expected_shapes(config)
  base_flat = loading.flatten_params(base_params)
  expert_flat = loading.flatten_params(expert_params)
  missing = sorted(n for n in expected if n not in base_flat and n not in expert_flat)
  if missing:
    raise experts_lib.ExpertError(
        f"Expert {source} lacks parameters that its model_config builds: "
        f"{missing[:5]}{' ...' if len(missing) > 5 else ''}. Export the expert again.")
  for name in expected:
    if name not in base_flat:
      base_flat[name] = np.zeros(expected[name], np.float32)  # Overwritten by the expert.
  return loading.unflatten_params(base_flat)

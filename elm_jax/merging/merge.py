"""Merge experts by averaging their trained parameters.

The method merges the top-k retrieved prompt experts by the uniform mean of their
trained parameters (adapters and layer norms). Weighted means take weights that
are normalized to sum to 1.

LoRA factors need care: the mean of the A and B factors is not the mean of the
updates A @ B that the experts learned. `lora_mode` chooses:

- "factors": average lora_a and lora_b separately (cheap, keeps the rank, but
  not the mean of the updates unless the experts share one factor);
- "concat": the exact mean of the updates with rank k * r, by stacking the
  weighted A factors and the B factors along the rank axis:
  [w_1 A_1 ... w_k A_k] @ [B_1; ...; B_k] = sum_i w_i A_i B_i.
  The merged model needs `LoraConfig(rank=k*r, alpha=k*alpha)`, which keeps the
  scale alpha / rank, and the merged metadata records that config;
- "svd": the best rank-r approximation of the mean update (truncated SVD),
  which is exact when that mean has rank at most r.

Every expert must have the same base fingerprint, the same kind of trainable
parameters and the same parameter names and shapes.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from elm_jax.checkpoints import experts as expert_files

LoraMode = Literal["factors", "concat", "svd"]
LORA_MODES = ("factors", "concat", "svd")


class MergeError(ValueError):
  """Experts that cannot be merged, or invalid merge settings."""


def normalize_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
  """Return float64 weights that sum to 1: uniform when `weights` is None."""
  if count < 1:
    raise MergeError("No experts to merge.")
  if weights is None:
    return np.full(count, 1.0 / count)
  weights = np.asarray(weights, np.float64)
  if weights.shape != (count,):
    raise MergeError(f"Got {weights.size} weights for {count} experts; give one per expert.")
  if np.any(weights < 0) or not np.isfinite(weights).all():
    raise MergeError(f"Merge weights must be finite and >= 0, got {weights.tolist()}.")
  total = weights.sum()
  if total <= 0:
    raise MergeError(f"Merge weights sum to {total}; at least one must be positive.")
  return weights / total


def _check_same_names(flats: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> None:
  reference = flats[0]
  for flat, label in zip(flats[1:], labels[1:]):
    differing = sorted(reference.keys() ^ flat.keys())
    if differing:
      raise MergeError(
          f"Experts {labels[0]} and {label} have different parameter names "
          f"(e.g. {differing[:3]}); merge experts trained with the same configuration.")
    for name, value in flat.items():
      if np.shape(value) != np.shape(reference[name]):
        raise MergeError(
            f"Parameter {name} has shape {np.shape(reference[name])} in {labels[0]} but "
            f"{np.shape(value)} in {label}.")


def _weighted_sum(values: Sequence[Any], weights: np.ndarray) -> np.ndarray:
  dtype = np.asarray(values[0]).dtype
  total = np.zeros(np.shape(values[0]), np.float32)
  for value, weight in zip(values, weights):
    total += np.float32(weight) * np.asarray(value, np.float32)
  return total.astype(dtype)


def _merge_lora_pair(a_factors, b_factors, weights, mode):
  """Return merged (lora_a [in, r'], lora_b [r', out]) for one projection."""
  if mode == "factors":
    return _weighted_sum(a_factors, weights), _weighted_sum(b_factors, weights)
  dtype = np.asarray(a_factors[0]).dtype
  if mode == "concat":
    a = np.concatenate([w * np.asarray(x, np.float32) for x, w in zip(a_factors, weights)], axis=1)
    b = np.concatenate([np.asarray(x, np.float32) for x in b_factors], axis=0)
    return a.astype(dtype), b.astype(dtype)
  # "svd": truncate the mean update to the original rank.
  rank = np.shape(a_factors[0])[1]
  update = sum(w * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
               for a, b, w in zip(a_factors, b_factors, weights))  # [in, out]
  u, s, vt = np.linalg.svd(update, full_matrices=False)
  root = np.sqrt(s[:rank])
  return (u[:, :rank] * root).astype(dtype), (root[:, None] * vt[:rank]).astype(dtype)


def average_params(param_trees: Sequence[Any],
                   weights: Sequence[float] | None = None,
                   *,
                   lora_mode: LoraMode = "factors",
                   labels: Sequence[str] | None = None) -> dict[str, Any]:
  """Return the weighted mean of parameter trees with equal names and shapes.

  Args:
    param_trees: nested mappings (a top-level "params" key is dropped).
    weights: one non-negative weight per tree, normalized to sum 1; None is
      the uniform mean.
    lora_mode: how `lora_a` / `lora_b` pairs merge (see the module doc).
    labels: names of the trees for error messages.

  Returns:
    A nested dict of numpy arrays in the input dtypes (summed in float32).
  """
  if lora_mode not in LORA_MODES:
    raise MergeError(f"Unknown lora_mode {lora_mode!r}; expected one of {LORA_MODES}.")
  flats = [expert_files.flatten_params(tree) for tree in param_trees]
  weights = normalize_weights(weights, len(flats))
  labels = list(labels) if labels is not None else [f"#{i}" for i in range(len(flats))]
  _check_same_names(flats, labels)

  merged = {}
  for name in flats[0]:
    if name in merged:
      continue
    prefix, leaf = name.rsplit("/", 1) if "/" in name else ("", name)
    if leaf in ("lora_a", "lora_b"):
      a_name, b_name = f"{prefix}/lora_a", f"{prefix}/lora_b"
      if a_name not in flats[0] or b_name not in flats[0]:
        raise MergeError(f"LoRA factor {name} has no partner ({a_name}, {b_name}).")
      merged[a_name], merged[b_name] = _merge_lora_pair(
          [f[a_name] for f in flats], [f[b_name] for f in flats], weights, lora_mode)
    else:
      merged[name] = _weighted_sum([f[name] for f in flats], weights)
  return expert_files.unflatten_params(merged)


def merge_experts(loaded: Sequence[tuple[expert_files.ExpertMetadata, Any]],
                  *,
                  expert_id: str,
                  weights: Sequence[float] | None = None,
                  lora_mode: LoraMode = "factors") -> tuple[expert_files.ExpertMetadata, dict]:
  """Merge loaded experts (`load_expert` results) into a new "merged" expert.

  Returns:
    `(metadata, params)` of the merged expert, ready for `save_expert`; its
    `sources` lists the merged ids and `merge` the method and weights.

  Raises:
    MergeError: the experts differ in base, trainable kind, parameter names or
      shapes (or LoRA config, for lora_mode "concat").
  """
  if not loaded:
    raise MergeError("No experts to merge.")
  expert_files.validate_id(expert_id)
  metadatas = [metadata for metadata, _ in loaded]
  first = metadatas[0]
  ids = [m.id for m in metadatas]

  bases = {m.base_fingerprint for m in metadatas}
  if len(bases) > 1:
    listing = ", ".join(f"{m.id}: {m.base_fingerprint}" for m in metadatas)
    raise MergeError(f"Experts were trained on different bases ({listing}); only experts "
                     "of one base can be merged.")
  kinds = {m.trainable for m in metadatas}
  if len(kinds) > 1:
    listing = ", ".join(f"{m.id}: {m.trainable}" for m in metadatas)
    raise MergeError(f"Experts train different parameters ({listing}); merge experts "
                     "of one trainable kind.")

  normalized = normalize_weights(weights, len(loaded))
  params = average_params([p for _, p in loaded], normalized, lora_mode=lora_mode, labels=ids)

  model_config, lora = dict(first.model_config), first.lora
  if first.trainable == "lora" and lora_mode == "concat":
    loras = [m.lora for m in metadatas]
    if any(l != loras[0] for l in loras) or loras[0] is None:
      raise MergeError(f"lora_mode 'concat' needs one LoRA config in all experts; got {loras}.")
    k = len(loaded)
    lora = {**loras[0], "rank": loras[0]["rank"] * k, "alpha": loras[0]["alpha"] * k}
    if model_config.get("lora") is not None:
      model_config["lora"] = lora

  metadata = expert_files.ExpertMetadata(
      id=expert_id,
      kind="merged",
      base_fingerprint=first.base_fingerprint,
      trainable=first.trainable,
      model_config=model_config,
      adapter=first.adapter,
      lora=lora,
      sources=ids,
      merge={"method": "uniform_mean" if weights is None else "weighted_mean",
             "weights": normalized.tolist(),
             "lora_mode": lora_mode if first.trainable == "lora" else None})
  return metadata, params


def merge_expert_dirs(directories: Sequence[str],
                      output: str,
                      *,
                      expert_id: str | None = None,
                      weights: Sequence[float] | None = None,
                      lora_mode: LoraMode = "factors",
                      overwrite: bool = False) -> expert_files.ExpertMetadata:
  """Load expert folders, merge them and save the result to `output`.

  The merged id defaults to the output folder's name.
  """
  loaded = [expert_files.load_expert(d) for d in directories]
  metadata, params = merge_experts(
      loaded, expert_id=expert_id or Path(output).name, weights=weights, lora_mode=lora_mode)
  return expert_files.save_expert(output, params=params, metadata=metadata, overwrite=overwrite)


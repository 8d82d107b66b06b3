"""Expert files: `expert.json` metadata and `params.safetensors` trained parameters.

An expert folder holds only the parameters its training changed (adapters and
layer norms, LoRA factors, or everything for full fine-tuning) and records the
fingerprint of the base model they belong to. Loading checks the
parameter file against its recorded sha256 and, given a base, the base against
the fingerprint. A mismatch raises instead of silently producing a broken model.

Parameter names are `/`-joined tree paths without the top-level "params" key,
e.g. `encoder/layers_0/mlp_adapter/down/kernel`.
"""

from collections.abc import Mapping
import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path
import re
import shutil
import tempfile
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from elm_jax import file_io

PARAMS_FILE = "params.safetensors"
METADATA_FILE = "expert.json"
KINDS = ("prompt", "dataset", "multitask", "merged")
TRAINABLE_KINDS = ("adapter", "lora", "full")
_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


class ExpertError(ValueError):
  """An invalid, corrupt or incompatible expert."""


class BaseMismatchError(ExpertError):
  """The expert was trained on another base model than the one given."""


@dataclasses.dataclass(frozen=True)
class ExpertMetadata:
  """The contents of `expert.json`.

  Attributes:
    id: unique name, characters [A-Za-z0-9._-] only (it becomes a folder name).
    kind: "prompt", "dataset", "multitask" or "merged".
    base_fingerprint: `fingerprint()` of the base model's parameters.
    trainable: which parameters the file holds: "adapter", "lora" or "full".
    task: the seqio Task or Mixture trained on.
    dataset: the training dataset, e.g. "cosmos_qa".
    prompt: the promptsource template name (prompt experts).
    model_config: the `T5Config` as a dict (`T5Config.to_dict()`).
    adapter: the `AdapterConfig` as a dict, or None.
    lora: the `LoraConfig` as a dict, or None.
    gin_config: the resolved gin config of the training run.
    steps: optimizer updates made.
    data_hash: a hash identifying the training data.
    validation_metrics: metric name to value.
    created: ISO 8601 time of saving; filled in by `save_expert` when empty.
    train_seconds: wall-clock training time.
    parameters: the parameter file's name inside the expert folder.
    parameters_sha256: sha256 of the parameter file; filled in by `save_expert`.
    sources: ids of the experts a merged expert was made from.
    merge: how they were merged (method, weights), or None.
  """
  id: str
  kind: str
  base_fingerprint: str
  trainable: str
  task: str | None = None
  dataset: str | None = None
  prompt: str | None = None
  model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
  adapter: dict[str, Any] | None = None
  lora: dict[str, Any] | None = None
  gin_config: str = ""
  steps: int = 0
  data_hash: str = ""
  validation_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  created: str = ""
  train_seconds: float = 0.0
  parameters: str = PARAMS_FILE
  parameters_sha256: str = ""
  sources: list[str] = dataclasses.field(default_factory=list)
  merge: dict[str, Any] | None = None

  def __post_init__(self):
    validate_id(self.id)
    if self.kind not in KINDS:
      raise ExpertError(f"Expert {self.id}: invalid kind {self.kind!r}; expected one of {KINDS}.")
    if self.trainable not in TRAINABLE_KINDS:
      raise ExpertError(f"Expert {self.id}: invalid trainable {self.trainable!r}; expected one "
                        f"of {TRAINABLE_KINDS}.")
    if Path(self.parameters).name != self.parameters or self.parameters in ("", ".", ".."):
      raise ExpertError(f"Expert {self.id}: parameters={self.parameters!r} must be a plain "
                        "file name inside the expert folder.")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], *, source: str = "expert.json") -> "ExpertMetadata":
    """Build metadata from parsed JSON; unknown keys are logged and ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
      raise ExpertError(f"{source}: missing required fields {missing}.")
    unknown = sorted(set(data) - names)
    if unknown:
      logging.warning("%s: ignoring unknown fields %s.", source, unknown)
    return cls(**{k: v for k, v in data.items() if k in names})


def validate_id(expert_id: str) -> str:
  """Return `expert_id` if it is a safe folder name, else raise ExpertError."""
  if (not isinstance(expert_id, str) or not _ID_PATTERN.fullmatch(expert_id)
      or expert_id in (".", "..")):
    raise ExpertError(
        f"Invalid expert id {expert_id!r}: use letters, digits, '.', '_' and '-' only "
        "(it becomes a folder name), and not '.' or '..'.")
  return expert_id


def expert_dir(root: str | os.PathLike[str], expert_id: str) -> Path:
  """Return `root/expert_id` after validating the id."""
  return Path(root) / validate_id(expert_id)


# ---------------------------------------------------------------------------
# Parameter trees.


def _unwrap(params: Any) -> Any:
  """Return the tree under a single top-level "params" key, if any."""
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    return params["params"]
  return params


def flatten_params(params: Any) -> dict[str, Any]:
  """Return `{"a/b/c": leaf}` for a nested mapping, without a top "params" key."""
  params = _unwrap(params)
  if not isinstance(params, Mapping):
    raise ExpertError(f"Expected a nested mapping of parameters, got {type(params).__name__}.")
  return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Return the nested dict for `{"a/b/c": leaf}` names."""
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _host_array(x: Any) -> np.ndarray:
  # NOTE: needs every shard on this host; multi-host sharded parameters must be
  # gathered (e.g. with multihost_utils.process_allgather) first.
  return np.asarray(jax.device_get(x))


def is_added_parameter(name: str) -> bool:
  """True for adapter and LoRA weights, which no pretrained T5 checkpoint has."""
  parts = name.split("/")
  return any(p.endswith("_adapter") for p in parts) or parts[-1] in ("lora_a", "lora_b")


def fingerprint(params: Any, *, include_added: bool = False) -> str:
  """Return a sha256 hex digest over the sorted names, shapes, dtypes and bytes.

  Adapter and LoRA weights are left out unless `include_added`, so a base
  checkpoint has the same fingerprint whether or not the model was built with
  (freshly initialized) adapters or LoRA. A top-level "params" key is ignored.

  Every byte is hashed. sha256 runs at roughly 0.5-2 GB/s on one CPU core (an
  estimate that depends on the hardware), so a 3B-parameter float32 base
  (12 GB) takes on the order of 10 seconds plus the device-to-host copy. Cache
  the value for a fixed base.
  """
  hasher = hashlib.sha256()
  flat = flatten_params(params)
  names = sorted(n for n in flat if include_added or not is_added_parameter(n))
  for name in names:
    array = np.ascontiguousarray(_host_array(flat[name]))
    header = f"{name}\0{tuple(array.shape)}\0{array.dtype.name}\0{array.nbytes}\0"
    hasher.update(header.encode("utf-8"))
    hasher.update(array.tobytes(order="C"))
  return hasher.hexdigest()


# Kept as a name of this module: callers and tests use `experts.file_sha256`.
file_sha256 = file_io.sha256_file


# ---------------------------------------------------------------------------
# Saving and loading.


def save_expert(directory: str | os.PathLike[str],
                *,
                params: Any,
                metadata: ExpertMetadata,
                overwrite: bool = False) -> ExpertMetadata:
  """Write an expert folder atomically and return its final metadata.

  The files are written into a temporary sibling folder that is then renamed
  to `directory`, so a crash leaves either no expert or a complete one.

  Args:
    directory: the expert folder to create.
    params: the trained parameters only (nested mapping; a top "params" key is
      dropped from the names).
    metadata: everything but `parameters_sha256` (computed here) and, when
      empty, `created` (set to now).
    overwrite: replace an existing folder; otherwise an existing one is an error.

  Returns:
    `metadata` with `parameters_sha256` and `created` filled in.
  """
  directory = Path(directory)
  if directory.exists() and not overwrite:
    raise ExpertError(f"Expert folder {directory} already exists; pass overwrite=True "
                      "or choose another folder.")
  flat = {name: np.asarray(_host_array(x), order="C") for name, x in flatten_params(params).items()}
  if not flat:
    raise ExpertError(f"Expert {metadata.id}: no parameters to save.")

  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    params_path = tmp / metadata.parameters
    safetensors_numpy.save_file(flat, str(params_path), metadata={"expert_id": metadata.id})
    created = metadata.created or datetime.datetime.now(datetime.timezone.utc).isoformat()
    metadata = dataclasses.replace(
        metadata, parameters_sha256=file_sha256(params_path), created=created)
    (tmp / METADATA_FILE).write_text(metadata.to_json(), encoding="utf-8")

    if directory.exists():
      old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("Saved expert %s (%d tensors) to %s.", metadata.id, len(flat), directory)
  return metadata


def load_metadata(directory: str | os.PathLike[str]) -> ExpertMetadata:
  """Read and validate `directory/expert.json`."""
  path = Path(directory) / METADATA_FILE
  if not path.is_file():
    raise ExpertError(f"{path} not found: {directory} is not an expert folder.")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ExpertError(f"{path}: invalid JSON ({e}).") from e
  if not isinstance(data, dict):
    raise ExpertError(f"{path}: expected a JSON object, got {type(data).__name__}.")
  try:
    return ExpertMetadata.from_dict(data, source=str(path))
  except TypeError as e:
    raise ExpertError(f"{path}: {e}") from e


def check_base(metadata: ExpertMetadata, base_fingerprint: str) -> None:
  """Raise BaseMismatchError unless the expert was trained on this base."""
  if metadata.base_fingerprint != base_fingerprint:
    raise BaseMismatchError(
        f"Expert {metadata.id} was trained on base {metadata.base_fingerprint}, but the "
        f"given base has fingerprint {base_fingerprint}. Load the base checkpoint the "
        "expert was trained from.")


def load_expert(directory: str | os.PathLike[str],
                *,
                base_params: Any = None,
                base_fingerprint: str | None = None) -> tuple[ExpertMetadata, dict[str, Any]]:
  """Read an expert folder, verifying its file checksum and, if given, its base.

  Args:
    directory: the expert folder.
    base_params: the base model's parameters; their fingerprint must match.
    base_fingerprint: the base's fingerprint, when already known (cheaper than
      `base_params`, which is hashed here).

  Returns:
    `(metadata, params)`, params a nested dict of numpy arrays.

  Raises:
    ExpertError: the folder, JSON or parameter file is missing or corrupt.
    BaseMismatchError: the base differs from the one the expert was trained on.
  """
  metadata = load_metadata(directory)
  if base_fingerprint is None and base_params is not None:
    base_fingerprint = fingerprint(base_params)
  if base_fingerprint is not None:
    check_base(metadata, base_fingerprint)

  params_path = Path(directory) / metadata.parameters
  if not params_path.is_file():
    raise ExpertError(f"Expert {metadata.id}: parameter file {params_path} not found.")
  actual = file_sha256(params_path)
  if actual != metadata.parameters_sha256:
    raise ExpertError(
        f"Expert {metadata.id}: {params_path} has sha256 {actual}, but expert.json records "
        f"{metadata.parameters_sha256}. The file is corrupt or was changed; save the "
        "expert again.")
  flat = safetensors_numpy.load_file(str(params_path))
  return metadata, unflatten_params(flat)


def apply_expert(base_params: Any, expert_params: Any) -> Any:
  """Return `base_params` with the expert's parameters put in their place.

  A top-level "params" key on either side is matched up. Expert leaves are cast
  to the dtype of the base leaf they replace.

  Raises:
    ExpertError: an expert parameter is absent from the base or has another
      shape (a different model config, or adapters or LoRA not enabled).
  """
  wrapped = isinstance(base_params, Mapping) and set(base_params.keys()) == {"params"}
  base_flat = flatten_params(base_params)
  expert_flat = flatten_params(expert_params)

  absent = sorted(name for name in expert_flat if name not in base_flat)
  if absent:
    raise ExpertError(
        f"Expert parameters not in the base model: {absent[:5]}"
        f"{' ...' if len(absent) > 5 else ''}. Build the base with the expert's "
        "model_config (adapter or LoRA settings).")
  misshaped = [f"{name}: expert {np.shape(x)} vs base {np.shape(base_flat[name])}"
               for name, x in expert_flat.items() if np.shape(x) != np.shape(base_flat[name])]
  if misshaped:
    raise ExpertError(f"Expert parameter shapes differ from the base: {misshaped[:5]}.")

  merged = dict(base_flat)
  for name, value in expert_flat.items():
    merged[name] = np.asarray(value, dtype=getattr(base_flat[name], "dtype", None))
  result = unflatten_params(merged)
  return {"params": result} if wrapped else result

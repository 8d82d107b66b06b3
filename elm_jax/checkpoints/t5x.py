"""T5X checkpoints: import into elm-jax's T5, and write the same layout.

A T5X checkpoint is a folder `checkpoint_<step>` inside the model directory:

  checkpoint_<step>/checkpoint        msgpack (flax.serialization) of
      {"version": 3, "optimizer": {"target": params, "state": {"step", "param_states"}}}
  checkpoint_<step>/target.encoder.layers_0.attention.query.kernel/
      .zarray, 0.0, 0.1, ...          one zarr array (gzip chunks) per parameter

In the msgpack tree a parameter is either an inline numpy array or, when T5X
wrote it with TensorStore, the TensorStore spec as a dict, for example
`{"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path":
"target.encoder.layers_0.attention.query.kernel"}, "metadata": {...}}`, whose
path is relative to the checkpoint folder. Only `target` is read; optimizer
state is ignored.

Scanned checkpoints (T5X's scalable_t5, `scan_layers=True`) store
`encoder/layers/...` with the layer axis at `param_scan_axis`, 1 by default; they
are unstacked on import.
"""

import dataclasses
import os
import re
import shutil
import time
from typing import Any, Mapping

from absl import logging
from flax import serialization
import numpy as np
import tensorstore as ts

from elm_jax.checkpoints import loading
from elm_jax.models import t5

CheckpointError = loading.CheckpointError
T5Config = t5.T5Config

MSGPACK_NAME = "checkpoint"
# The checkpoint format version T5X has written since 2021 (bfloat16 stored natively).
T5X_VERSION = 3
# T5X aims for zarr chunks of at most 64 MiB.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
# Layer axis of scanned parameters in T5X's scalable_t5 (`param_scan_axis`).
T5X_SCAN_AXIS = 1

_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")
_LAYER_NAME = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.+)$")


def find_checkpoint_dir(path: str | os.PathLike[str]) -> str:
  """Returns the `checkpoint_<step>` folder that `path` names or contains.

  Args:
    path: the msgpack `checkpoint` file, a `checkpoint_<step>` folder, or a model
      directory, in which case the highest step with a complete checkpoint wins.

  Raises:
    CheckpointError: no checkpoint was found.
  """
  path = os.fspath(path)
  if os.path.isfile(path) and os.path.basename(path) == MSGPACK_NAME:
    return os.path.dirname(os.path.abspath(path))
  if os.path.isfile(os.path.join(path, MSGPACK_NAME)):
    return path
  steps = []
  if os.path.isdir(path):
    for name in os.listdir(path):
      match = _STEP_DIR.match(name)  # Skips T5X's unfinished `.tmp-<time>` folders.
      if match and os.path.isfile(os.path.join(path, name, MSGPACK_NAME)):
        steps.append((int(match.group(1)), name))
  if not steps:
    raise CheckpointError(
        f"{path} contains no T5X checkpoint: expected a file named {MSGPACK_NAME!r} in it "
        "or in a checkpoint_<step> folder inside it.")
  return os.path.join(path, max(steps)[1])


def is_t5x_dir(path: str | os.PathLike[str]) -> bool:
  """Returns True when `path` is or contains a T5X checkpoint."""
  try:
    find_checkpoint_dir(path)
  except CheckpointError:
    return False
  return True


def _is_ts_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and "driver" in value and "kvstore" in value


def _relative_array_path(spec: Mapping[str, Any], name: str) -> str:
  """Returns the spec's array folder, relative to the checkpoint folder."""
  kvstore = spec["kvstore"]
  if not isinstance(kvstore, Mapping):
    raise CheckpointError(f"Parameter {name}: TensorStore kvstore {kvstore!r} is not a dict.")
  driver = kvstore.get("driver")
  # T5X writes `file` locally and `gcs` with a dummy bucket; a copied gcs checkpoint
  # keeps its arrays beside the msgpack file, so both resolve locally.
  if driver not in ("file", "gfile", "gcs"):
    raise CheckpointError(f"Parameter {name}: TensorStore kvstore driver {driver!r} is not "
                          "supported; expected file or gcs.")
  relative = kvstore.get("path", spec.get("path"))  # tensorstore < 0.1.14 put it in spec.
  if not isinstance(relative, str) or not relative:
    raise CheckpointError(f"Parameter {name}: the TensorStore spec has no path: {dict(spec)}.")
  parts = relative.strip("/").split("/")
  if os.path.isabs(relative) or any(p in ("", ".", "..") for p in parts):
    raise CheckpointError(
        f"Parameter {name}: TensorStore path {relative!r} is not a relative path inside "
        "the checkpoint folder.")
  return os.path.join(*parts)


def _read_ts_array(spec: Mapping[str, Any], checkpoint_dir: str, name: str) -> np.ndarray:
  if spec.get("driver") != "zarr":
    raise CheckpointError(f"Parameter {name}: TensorStore driver {spec.get('driver')!r} is "
                          "not supported; T5X writes zarr.")
  array_dir = os.path.join(checkpoint_dir, _relative_array_path(spec, name))
  if not os.path.isfile(os.path.join(array_dir, ".zarray")):
    raise CheckpointError(f"Parameter {name}: its array {array_dir} (a zarr folder with "
                          ".zarray) is missing.")
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": array_dir}},
                  open=True, read=True).result()
  array = store.read().result()
  shape = spec.get("metadata", {}).get("shape")
  if shape is not None and tuple(shape) != array.shape:
    raise CheckpointError(f"Parameter {name}: the msgpack spec says shape {tuple(shape)} "
                          f"but {array_dir} contains shape {array.shape}.")
  return array


def read_target(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads the `target` (model parameters) of a T5X checkpoint.

  Returns:
    `/`-joined parameter name -> float32 numpy array, in the checkpoint's own
    layout (scanned or not).
  """
  checkpoint_dir = find_checkpoint_dir(path)
  msgpack_path = os.path.join(checkpoint_dir, MSGPACK_NAME)
  with open(msgpack_path, "rb") as f:
    raw = f.read()
  if raw.startswith(b"model_checkpoint_path"):
    raise CheckpointError(f"{msgpack_path} is a TensorFlow checkpoint index, not a T5X "
                          "checkpoint; convert the TF checkpoint with T5X first.")
  try:
    contents = serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises several unrelated types on bad input.
    raise CheckpointError(f"{msgpack_path} is not a msgpack T5X checkpoint: {e!r}.") from e
  if not isinstance(contents, Mapping):
    raise CheckpointError(f"{msgpack_path} does not hold a dict.")
  state = contents.get("optimizer", contents)
  if not isinstance(state, Mapping) or "target" not in state:
    raise CheckpointError(f"{msgpack_path} has no 'target' entry (keys: "
                          f"{sorted(state) if isinstance(state, Mapping) else type(state)}).")
  version = contents.get("version")
  if version is not None and int(version) < T5X_VERSION:
    # NOTE: version 2 stored bfloat16 as uint16; such arrays are not converted here.
    logging.warning("%s has T5X checkpoint version %s; version %d is expected.",
                    msgpack_path, version, T5X_VERSION)

  flat = {}
  for name, value in _flatten_until_spec(state["target"]).items():
    if _is_ts_spec(value):
      array = _read_ts_array(value, checkpoint_dir, name)
    else:
      array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
      raise CheckpointError(f"Parameter {name} of {msgpack_path} has dtype {array.dtype}; "
                            "model parameters are floating point.")
    flat[name] = np.asarray(array, np.float32)
  logging.info("Read %d T5X arrays from %s", len(flat), checkpoint_dir)
  return flat


def _flatten_until_spec(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Flattens nested dicts to `/`-joined names, keeping TensorStore specs whole."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and not _is_ts_spec(value):
      flat.update(_flatten_until_spec(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unstack_scanned(flat: Mapping[str, np.ndarray], *,
                    scan_axis: int = T5X_SCAN_AXIS) -> dict[str, np.ndarray]:
  """Splits `encoder/layers/...` arrays of a scanned checkpoint into `layers_i`.

  Unscanned names pass through unchanged.
  """
  out = {}
  for name, array in flat.items():
    parts = name.split("/")
    if len(parts) > 2 and parts[0] in ("encoder", "decoder") and parts[1] == "layers":
      if parts[2] in ("relative_posemb", "relpos_bias"):
        raise CheckpointError(
            f"Parameter {name} is a relative position bias per layer; elm-jax's T5 shares "
            "one bias table per stack, as T5 and T5 v1.1 do, and cannot load it.")
      rest = "/".join(parts[2:])
      for i, layer in enumerate(np.moveaxis(array, scan_axis, 0)):
        out[f"{parts[0]}/layers_{i}/{rest}"] = np.ascontiguousarray(layer)
    else:
      out[name] = array
  return out


def infer_config(flat: Mapping[str, np.ndarray], **overrides: Any) -> T5Config:
  """Infers a T5Config from unscanned parameter shapes.

  The checkpoint does not store `relative_attention_max_distance`,
  `layer_norm_epsilon`, `dropout_rate` or the gated activation, so they take the
  T5 v1.1 values (128, 1e-6, 0.1, gated GELU) unless given in `overrides`.

  Raises:
    CheckpointError: a parameter that every T5 has is missing.
  """
  def shape(name: str) -> tuple[int, ...]:
    if name not in flat:
      raise CheckpointError(f"Cannot infer the model config: parameter {name} is missing. "
                            "Pass the config of the checkpoint's model.")
    return tuple(flat[name].shape)

  vocab_size, d_model = shape("token_embedder/embedding")
  num_heads, num_buckets = shape("encoder/relpos_bias/rel_embedding")
  joined_kv = shape("encoder/layers_0/attention/query/kernel")[1]
  gated = "encoder/layers_0/mlp/wi_0/kernel" in flat
  d_ff = shape("encoder/layers_0/mlp/wi_0/kernel" if gated else "encoder/layers_0/mlp/wi/kernel")[1]
  layers = {"encoder": set(), "decoder": set()}
  for name in flat:
    match = _LAYER_NAME.match(name)
    if match:
      layers[match.group(1)].add(int(match.group(2)))
  fields = dict(
      vocab_size=vocab_size, d_model=d_model, d_kv=joined_kv // num_heads, d_ff=d_ff,
      num_heads=num_heads, num_encoder_layers=len(layers["encoder"]),
      num_decoder_layers=len(layers["decoder"]), relative_attention_num_buckets=num_buckets,
      feed_forward="gated-gelu" if gated else "relu",
      tie_word_embeddings="decoder/logits_dense/kernel" not in flat)
  fields.update(overrides)
  return T5Config(**fields)


def load_t5x(path: str | os.PathLike[str], config: T5Config | None = None, *,
             scan_axis: int = T5X_SCAN_AXIS) -> tuple[T5Config, dict[str, Any]]:
  """Loads a T5X checkpoint as (T5Config, params).

  Args:
    path: see `find_checkpoint_dir`.
    config: the model config, for example from the gin file the checkpoint was
      trained with. Without it the config is inferred from the shapes (see
      `infer_config`). Every parameter shape is checked against it.
    scan_axis: layer axis of scanned parameters in the checkpoint.

  Returns:
    (config, params), params stacked when `config.scan_layers`.

  Raises:
    CheckpointError: naming the parameter and both shapes, or listing missing and
      unexpected names, when the checkpoint does not fit the config.
  """
  checkpoint_dir = find_checkpoint_dir(path)
  flat = unstack_scanned(read_target(checkpoint_dir), scan_axis=scan_axis)
  if config is None:
    config = infer_config(flat)
    logging.warning(
        "No config given for %s; inferred %s. relative_attention_max_distance, "
        "layer_norm_epsilon and the activation are not stored in T5X checkpoints and were "
        "assumed.", checkpoint_dir, config)
  unscanned = dataclasses.replace(loading.base_config(config), scan_layers=False)
  loading.check_param_shapes(
      loading.expected_shapes(unscanned), {k: v.shape for k, v in flat.items()},
      source=checkpoint_dir,
      hint="The checkpoint is for another model than the config describes.")
  params = loading.unflatten_params(flat)
  if config.scan_layers:
    params = loading.to_numpy(t5.stack_layers(params))
  return config, params


def _choose_chunk_shape(shape: tuple[int, ...], max_elements: int) -> tuple[int, ...]:
  """Shrinks the largest dimension to its next smaller divisor until under the limit."""
  chunk = list(shape)
  while int(np.prod(chunk)) > max(1, max_elements):
    axis = int(np.argmax(chunk))
    size, full = chunk[axis], shape[axis]
    chunk[axis] = max(d for d in range(1, size) if full % d == 0) if size > 1 else 1
  return tuple(chunk)


def write_t5x_checkpoint(model_dir: str | os.PathLike[str], step: int,
                         params: Mapping[str, Any], *,
                         param_states: Mapping[str, Any] | None = None,
                         inline: tuple[str, ...] = (),
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> str:
  """Writes `params` as T5X's `checkpoint_<step>` folder and returns its path.

  The folder is assembled as `checkpoint_<step>.tmp-<time>` and renamed when
  complete, as T5X does.

  Args:
    model_dir: the model directory; created if missing.
    step: the training step in the folder name and in `state/step`.
    params: the nested parameter tree (T5X names).
    param_states: optimizer state to store under `state/param_states`; its
      arrays are written with TensorStore as well.
    inline: `/`-joined parameter names stored inline in the msgpack file, as T5X
      does for parameters without a partitioning.
    chunk_bytes: maximum zarr chunk size.

  Raises:
    FileExistsError: the step's folder exists.
  """
  model_dir = os.fspath(model_dir)
  final_dir = os.path.join(model_dir, f"checkpoint_{int(step)}")
  if os.path.exists(final_dir):
    raise FileExistsError(f"{final_dir} exists; T5X never overwrites a checkpoint step.")
  os.makedirs(model_dir, exist_ok=True)
  tmp_dir = f"{final_dir}.tmp-{int(time.time())}"
  os.makedirs(tmp_dir)
  try:
    def write(prefix: str, tree: Mapping[str, Any]) -> dict[str, Any]:
      out = {}
      for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
          out[key] = write(name, value)
          continue
        array = np.asarray(value)
        if name.split("/", 1)[1] in inline:
          out[key] = array
          continue
        spec = ts.Spec({
            "driver": "zarr",
            "dtype": array.dtype.name,
            "kvstore": {"driver": "file", "path": name.replace("/", ".")},
            "metadata": {
                "compressor": {"id": "gzip"},
                "shape": list(array.shape),
                "chunks": list(_choose_chunk_shape(array.shape,
                                                   chunk_bytes // array.dtype.itemsize)),
            },
        })
        absolute = spec.to_json()
        absolute["kvstore"]["path"] = os.path.join(tmp_dir, absolute["kvstore"]["path"])
        ts.open(absolute, create=True, open=True).result().write(array).result()
        out[key] = spec.to_json()  # The msgpack keeps the relative path.
      return out

    state = {
        "target": write("target", params),
        "state": {"step": np.asarray(step, np.int32),
                  "param_states": write("state/param_states", param_states or {})},
    }
    with open(os.path.join(tmp_dir, MSGPACK_NAME), "wb") as f:
      f.write(serialization.msgpack_serialize({"version": T5X_VERSION, "optimizer": state}))
    os.rename(tmp_dir, final_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return final_dir

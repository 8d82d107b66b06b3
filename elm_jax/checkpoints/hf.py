"""Hugging Face T5 checkpoints: import into elm-jax's T5 and export back.

A Hugging Face T5 directory contains `config.json` and the weights as
`model.safetensors`, sharded safetensors listed in `model.safetensors.index.json`,
or PyTorch's `pytorch_model.bin` (read only when torch is installed, with
`weights_only=True`, so nothing is unpickled beyond tensors).

Name mapping (HF `nn.Linear` weights are `[out, in]`; elm-jax kernels are
`[in, out]`, so every projection is transposed):

  shared.weight (also encoder.embed_tokens, decoder.embed_tokens)  token_embedder/embedding
  {enc,dec}oder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
      [buckets, heads]                                            {enc,dec}oder/relpos_bias/rel_embedding [heads, buckets]
  encoder.block.i.layer.0.SelfAttention.{q,k,v,o}                 encoder/layers_i/attention/{query,key,value,out}
  encoder.block.i.layer.1.DenseReluDense.{wi,wi_0,wi_1,wo}        encoder/layers_i/mlp/...
  decoder.block.i.layer.1.EncDecAttention.{q,k,v,o}               decoder/layers_i/encoder_decoder_attention/...
  decoder.block.i.layer.2.DenseReluDense...                       decoder/layers_i/mlp/...
  {enc,dec}oder.final_layer_norm.weight                           {enc,dec}oder/{enc,dec}oder_norm/scale
  lm_head.weight (untied models only)                             decoder/logits_dense/kernel
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

from absl import logging
import numpy as np
import safetensors.numpy

from elm_jax.checkpoints import loading
from elm_jax.models import t5

CheckpointError = loading.CheckpointError
T5Config = t5.T5Config

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# transformers' own default for `save_pretrained(max_shard_size=...)`.
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000

_EMBEDDING_ALIASES = ("shared.weight", "encoder.embed_tokens.weight",
                      "decoder.embed_tokens.weight")
_FEED_FORWARD_ACTIVATION = {"relu": "relu", "gated-gelu": "gelu_new"}
_SUPPORTED_MODEL_TYPES = ("t5", "mt5")


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One parameter: its elm-jax name, HF name, elm-jax shape, and orientation."""
  name: str
  hf_name: str
  shape: tuple[int, ...]
  transpose: bool


def is_hf_dir(path: str | os.PathLike[str]) -> bool:
  """Returns True when `path` contains config.json and weights in a known layout."""
  path = os.fspath(path)
  if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
    return False
  return any(os.path.isfile(os.path.join(path, name)) for name in
             (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME))


def config_from_hf(hf_config: Mapping[str, Any], *, source: str = "config.json",
                   **overrides: Any) -> T5Config:
  """Builds a T5Config from a Hugging Face T5 `config.json` dict.

  Keys that the file leaves out take transformers' T5Config defaults, as
  transformers itself would load the file (for example `tie_word_embeddings`
  defaults to true and `feed_forward_proj` to "relu").

  Args:
    hf_config: the parsed config.json.
    source: the file, for error messages.
    **overrides: T5Config fields that the file does not describe (dtype,
      scan_layers, remat_policy, adapter, lora).

  Raises:
    CheckpointError: the model type or feed-forward kind is not supported.
  """
  model_type = hf_config.get("model_type", "t5")
  if model_type not in _SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
        f"{source} has model_type {model_type!r}; only {_SUPPORTED_MODEL_TYPES} "
        "checkpoints share T5's architecture and can be imported.")
  feed_forward = hf_config.get("feed_forward_proj", "relu")
  if feed_forward not in _FEED_FORWARD_ACTIVATION:
    raise CheckpointError(
        f"{source} has feed_forward_proj {feed_forward!r}; elm-jax's T5 supports "
        f"{sorted(_FEED_FORWARD_ACTIVATION)}.")
  num_layers = int(hf_config.get("num_layers", 6))
  num_decoder_layers = hf_config.get("num_decoder_layers")
  fields = dict(
      vocab_size=int(hf_config.get("vocab_size", 32128)),
      d_model=int(hf_config.get("d_model", 512)),
      d_kv=int(hf_config.get("d_kv", 64)),
      d_ff=int(hf_config.get("d_ff", 2048)),
      num_heads=int(hf_config.get("num_heads", 8)),
      num_encoder_layers=num_layers,
      num_decoder_layers=int(num_layers if num_decoder_layers is None else num_decoder_layers),
      relative_attention_num_buckets=int(hf_config.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(hf_config.get("relative_attention_max_distance", 128)),
      dropout_rate=float(hf_config.get("dropout_rate", 0.1)),
      layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-6)),
      feed_forward=feed_forward,
      tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
  )
  fields.update(overrides)
  return T5Config(**fields)


def config_to_hf(config: T5Config) -> dict[str, Any]:
  """Returns the config.json dict that transformers 4.57 loads as this model."""
  if config.feed_forward not in _FEED_FORWARD_ACTIVATION:
    raise CheckpointError(f"feed_forward {config.feed_forward!r} has no Hugging Face "
                          "equivalent.")
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_heads": config.num_heads,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "feed_forward_proj": config.feed_forward,
      "dense_act_fn": _FEED_FORWARD_ACTIVATION[config.feed_forward],
      "is_gated_act": config.feed_forward.startswith("gated-"),
      "tie_word_embeddings": config.tie_word_embeddings,
      "initializer_factor": 1.0,
      "is_encoder_decoder": True,
      "use_cache": True,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "decoder_start_token_id": 0,
      "dtype": "float32",
  }


def _name_table(config: T5Config) -> list[_Entry]:
  """Lists every base parameter of `config` (unscanned) with its HF name."""
  d, v = config.d_model, config.vocab_size
  joined_kv = config.num_heads * config.d_kv
  entries = [_Entry("token_embedder/embedding", "shared.weight", (v, d), False)]
  mlp_names = ("wi_0", "wi_1") if config.feed_forward.startswith("gated-") else ("wi",)

  def attention(prefix: str, hf_prefix: str) -> list[_Entry]:
    return [
        _Entry(f"{prefix}/query/kernel", f"{hf_prefix}.q.weight", (d, joined_kv), True),
        _Entry(f"{prefix}/key/kernel", f"{hf_prefix}.k.weight", (d, joined_kv), True),
        _Entry(f"{prefix}/value/kernel", f"{hf_prefix}.v.weight", (d, joined_kv), True),
        _Entry(f"{prefix}/out/kernel", f"{hf_prefix}.o.weight", (joined_kv, d), True),
    ]

  def mlp(prefix: str, hf_prefix: str) -> list[_Entry]:
    out = [_Entry(f"{prefix}/{n}/kernel", f"{hf_prefix}.{n}.weight", (d, config.d_ff), True)
           for n in mlp_names]
    out.append(_Entry(f"{prefix}/wo/kernel", f"{hf_prefix}.wo.weight", (config.d_ff, d), True))
    return out

  def norm(name: str, hf_name: str) -> _Entry:
    return _Entry(f"{name}/scale", f"{hf_name}.weight", (d,), False)

  for stack, num_layers in (("encoder", config.num_encoder_layers),
                            ("decoder", config.num_decoder_layers)):
    entries.append(_Entry(
        f"{stack}/relpos_bias/rel_embedding",
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (config.num_heads, config.relative_attention_num_buckets), True))
    for i in range(num_layers):
      layer, block = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
      if stack == "encoder":
        entries.append(norm(f"{layer}/pre_attention_layer_norm", f"{block}.0.layer_norm"))
        entries += attention(f"{layer}/attention", f"{block}.0.SelfAttention")
        entries.append(norm(f"{layer}/pre_mlp_layer_norm", f"{block}.1.layer_norm"))
        entries += mlp(f"{layer}/mlp", f"{block}.1.DenseReluDense")
      else:
        entries.append(norm(f"{layer}/pre_self_attention_layer_norm", f"{block}.0.layer_norm"))
        entries += attention(f"{layer}/self_attention", f"{block}.0.SelfAttention")
        entries.append(norm(f"{layer}/pre_cross_attention_layer_norm", f"{block}.1.layer_norm"))
        entries += attention(f"{layer}/encoder_decoder_attention", f"{block}.1.EncDecAttention")
        entries.append(norm(f"{layer}/pre_mlp_layer_norm", f"{block}.2.layer_norm"))
        entries += mlp(f"{layer}/mlp", f"{block}.2.DenseReluDense")
    entries.append(norm(f"{stack}/{stack}_norm", f"{stack}.final_layer_norm"))
  if not config.tie_word_embeddings:
    entries.append(_Entry("decoder/logits_dense/kernel", "lm_head.weight", (d, v), True))
  return entries


def _hf_shape(entry: _Entry) -> tuple[int, ...]:
  return entry.shape[::-1] if entry.transpose else entry.shape


def params_from_hf_state(state: Mapping[str, np.ndarray], config: T5Config, *,
                         source: str = "the checkpoint") -> dict[str, Any]:
  """Converts a Hugging Face T5 state dict into elm-jax's parameter tree.

  Args:
    state: HF parameter name -> array (numpy, or anything `np.asarray` accepts).
    config: the model config; with `scan_layers` the result is stacked.
    source: the checkpoint, for error messages.

  Returns:
    Nested dict of float32 numpy arrays.

  Raises:
    CheckpointError: a parameter is missing or unexpected, has the wrong shape,
      or the embedding aliases (or a tied lm_head) disagree.
  """
  base = loading.base_config(config)
  remaining = dict(state)

  # The embedding may be stored under any of its aliases, or several of them.
  embeddings = [(k, remaining.pop(k)) for k in _EMBEDDING_ALIASES if k in remaining]
  if embeddings:
    first_name, first = embeddings[0]
    for name, other in embeddings[1:]:
      if np.shape(other) != np.shape(first) or not np.array_equal(other, first):
        raise CheckpointError(f"{source}: {name} differs from {first_name}; they are "
                              "aliases of one embedding and must be equal.")
    remaining["shared.weight"] = first
  if config.tie_word_embeddings and "lm_head.weight" in remaining:
    lm_head = remaining.pop("lm_head.weight")
    if embeddings and (np.shape(lm_head) != np.shape(embeddings[0][1])
                       or not np.array_equal(lm_head, embeddings[0][1])):
      raise CheckpointError(
          f"{source}: tie_word_embeddings is true but lm_head.weight differs from the "
          "shared embedding. Set tie_word_embeddings to false in config.json if the "
          "LM head is trained separately.")

  table = _name_table(base)
  expected_hf = {e.hf_name: _hf_shape(e) for e in table}
  found_hf = {k: tuple(np.shape(v)) for k, v in remaining.items()}
  loading.check_param_shapes(
      expected_hf, found_hf, source=source,
      hint="The config.json does not describe these weights, or the weights are not "
      "a T5 model.")

  flat = {}
  for entry in table:
    array = np.asarray(remaining[entry.hf_name], dtype=np.float32)
    flat[entry.name] = np.ascontiguousarray(array.T) if entry.transpose else array
  params = loading.unflatten_params(flat)
  if config.scan_layers:
    params = loading.to_numpy(t5.stack_layers(params))
  return params


def hf_state_from_params(params: Mapping[str, Any], config: T5Config) -> dict[str, np.ndarray]:
  """Converts elm-jax parameters into a Hugging Face T5 state dict (float32 numpy).

  Raises:
    CheckpointError: the parameters do not match `config`, or hold adapter or
      LoRA weights, which Hugging Face's T5 has no place for.
  """
  if config.scan_layers:
    params = t5.unstack_layers(params)
  flat = loading.flatten_params(params)
  table = _name_table(loading.base_config(config))
  loading.check_param_shapes(
      {e.name: e.shape for e in table},
      {k: tuple(np.shape(v)) for k, v in flat.items()}, source="the parameters",
      hint="Export takes a base T5 model: merge LoRA weights and drop adapters first, "
      "and pass the config the parameters were built with.")
  state = {}
  for entry in table:
    array = np.asarray(flat[entry.name], dtype=np.float32)
    state[entry.hf_name] = np.ascontiguousarray(array.T if entry.transpose else array)
  return state


def read_hf_state(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads the weights of a Hugging Face directory into numpy arrays.

  Prefers safetensors (single file, then sharded with an index) over PyTorch files.

  Raises:
    CheckpointError: no weights file, an index that names a missing shard, or a
      PyTorch file while torch is not installed.
  """
  directory = os.fspath(directory)
  single = os.path.join(directory, SAFETENSORS_NAME)
  if os.path.isfile(single):
    return safetensors.numpy.load_file(single)
  index = os.path.join(directory, SAFETENSORS_INDEX_NAME)
  if os.path.isfile(index):
    return _read_sharded(directory, index, safetensors.numpy.load_file)
  torch_single = os.path.join(directory, TORCH_NAME)
  if os.path.isfile(torch_single):
    return _torch_load(torch_single)
  torch_index = os.path.join(directory, TORCH_INDEX_NAME)
  if os.path.isfile(torch_index):
    return _read_sharded(directory, torch_index, _torch_load)
  raise CheckpointError(
      f"{directory} contains no weights: looked for {SAFETENSORS_NAME}, "
      f"{SAFETENSORS_INDEX_NAME}, {TORCH_NAME} and {TORCH_INDEX_NAME}.")


def _read_sharded(directory: str, index_path: str, read_fn) -> dict[str, np.ndarray]:
  with open(index_path, encoding="utf-8") as f:
    try:
      weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index_path} is not a valid index: {e!r}.") from e
  state = {}
  for shard in sorted(set(weight_map.values())):
    if os.path.basename(shard) != shard or shard in ("", ".", ".."):
      raise CheckpointError(f"{index_path} names shard {shard!r}, which is not a plain "
                            "file name in the checkpoint directory.")
    shard_path = os.path.join(directory, shard)
    if not os.path.isfile(shard_path):
      raise CheckpointError(f"{index_path} lists shard {shard}, which is missing from "
                            f"{directory}.")
    state.update(read_fn(shard_path))
  listed = set(weight_map)
  if set(state) != listed:
    raise CheckpointError(
        f"{index_path} does not match its shards: listed but not stored "
        f"{sorted(listed - set(state))}, stored but not listed {sorted(set(state) - listed)}.")
  return state


def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(
        f"{path} is a PyTorch file and torch is not installed. Install torch "
        "(`pip install torch`), or convert the checkpoint to safetensors with "
        "transformers' `save_pretrained(..., safe_serialization=True)`.") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def read_hf_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads config.json of a Hugging Face directory."""
  path = os.path.join(os.fspath(directory), CONFIG_NAME)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise CheckpointError(f"{path} is missing; a Hugging Face T5 directory needs it.") from e
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}.") from e


def load_hf(directory: str | os.PathLike[str],
            config: T5Config | None = None) -> tuple[T5Config, dict[str, Any]]:
  """Loads a Hugging Face T5 directory as (T5Config, params).

  Args:
    directory: contains config.json and the weights.
    config: when given, it must agree with config.json on every architecture field;
      its dtype, scan_layers, remat_policy, adapter and lora are kept.

  Raises:
    CheckpointError: on unreadable files or any parameter that does not fit.
  """
  directory = os.fspath(directory)
  config_path = os.path.join(directory, CONFIG_NAME)
  checkpoint_config = config_from_hf(read_hf_config(directory), source=config_path)
  if config is None:
    config = checkpoint_config
  else:
    loading.check_same_architecture(config, checkpoint_config, config_path)
  state = read_hf_state(directory)
  params = params_from_hf_state(state, config, source=directory)
  logging.info("Loaded %d Hugging Face tensors from %s", len(state), directory)
  return config, params


def save_hf(directory: str | os.PathLike[str], config: T5Config,
            params: Mapping[str, Any], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False) -> None:
  """Writes a Hugging Face T5 directory that transformers loads directly.

  The directory is assembled under a temporary name beside `directory` and renamed
  into place, so a failure leaves no partial directory behind.

  Args:
    directory: the output directory; it must not exist unless `overwrite`.
    config: the config the parameters were built with.
    params: the parameter tree (scanned when `config.scan_layers`).
    max_shard_bytes: above this total size, weights are split into
      `model-0000i-of-0000n.safetensors` files listed in
      model.safetensors.index.json; one tensor is never split.
    overwrite: replace an existing `directory` (its old contents are deleted).

  Raises:
    CheckpointError: the parameters do not fit `config`, or `directory` exists.
    FileExistsError: `directory` exists and `overwrite` is False.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it.")
  state = hf_state_from_params(params, config)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
      json.dump(config_to_hf(config), f, indent=2, sort_keys=True)
      f.write("\n")
    _write_safetensors(tmp, state, max_shard_bytes)
    _replace_dir(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("Wrote Hugging Face T5 checkpoint %s", directory)


def _write_safetensors(directory: str, state: Mapping[str, np.ndarray],
                       max_shard_bytes: int) -> None:
  """Writes one file, or shards with an index when the total is over the limit."""
  # transformers rejects safetensors files without the `format` metadata.
  metadata = {"format": "pt"}
  total = sum(a.nbytes for a in state.values())
  if total <= max_shard_bytes:
    safetensors.numpy.save_file(dict(state), os.path.join(directory, SAFETENSORS_NAME),
                                metadata=metadata)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  shard_bytes = 0
  for name, array in state.items():
    if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
      shards.append({})
      shard_bytes = 0
    shards[-1][name] = array
    shard_bytes += array.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(directory, file_name), metadata=metadata)
    weight_map.update({name: file_name for name in shard})
  with open(os.path.join(directory, SAFETENSORS_INDEX_NAME), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
              sort_keys=True)


def _replace_dir(src: str, dst: str) -> None:
  """Renames `src` to `dst`, moving an existing `dst` aside until the rename is done."""
  if not os.path.exists(dst):
    os.rename(src, dst)
    return
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
  os.rmdir(old)
  os.rename(dst, old)
  try:
    os.rename(src, dst)
  except BaseException:
    os.rename(old, dst)
    raise
  shutil.rmtree(old, ignore_errors=True)


"""Load a T5 model from a checkpoint directory of any supported format.

`load_model(path)` detects the format of `path` and returns `(T5Config, params)`.
Built-in formats are a Hugging Face T5 directory (`hf`) and a T5X checkpoint
(`t5x`). Other formats plug in through `register_loader`:

  from elm_jax.checkpoints import loading

  def is_orbax_model_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))

  def load_orbax_model(path: str, config: T5Config | None) -> tuple[T5Config, Params]:
    ...

  loading.register_loader("orbax", is_orbax_model_dir, load_orbax_model,
                          description="an elm-jax model directory with checkpoints/")

Loaders are tried in registration order, built-in ones first, and the first whose
detect function returns True loads the directory.

The module also contains what the format-specific modules share: `CheckpointError`,
the expected parameter shapes for a config, and the comparison that turns a
mismatch into an error naming the parameter and both shapes.
"""

import dataclasses
import os
from typing import Any, Callable, Mapping

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np

from elm_jax.models import t5

T5Config = t5.T5Config
Params = Mapping[str, Any]
DetectFn = Callable[[str], bool]
LoadFn = Callable[[str, "T5Config | None"], tuple[T5Config, Params]]

# Config fields that change a parameter shape or the function the model computes.
# A checkpoint and a config given for it must agree on all of them.
ARCHITECTURE_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
    "num_decoder_layers", "relative_attention_num_buckets",
    "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward",
    "tie_word_embeddings")
# Shape mismatches listed in one error; the count of the rest follows.
_MAX_LISTED = 20


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed, or does not fit the model config."""


@dataclasses.dataclass(frozen=True)
class _Loader:
  kind: str
  detect: DetectFn
  load: LoadFn
  description: str


_LOADERS: list[_Loader] = []


def register_loader(kind: str, detect_fn: DetectFn, load_fn: LoadFn, *,
                    description: str = "") -> None:
  """Registers a checkpoint format for `load_model`.

  Args:
    kind: a short unique name for the format, such as "orbax".
    detect_fn: `detect_fn(path) -> bool`, True when `path` is in this format. It
      must be cheap (look at file names, not weights) and must not raise.
    load_fn: `load_fn(path, config) -> (T5Config, params)`, where `config` is the
      caller's config or None; params are the unscanned or scanned tree that
      `config.scan_layers` asks for.
    description: what the format looks like on disk, shown when no loader matches.

  Raises:
    ValueError: `kind` is already registered.
  """
  if any(loader.kind == kind for loader in _LOADERS):
    raise ValueError(f"A checkpoint loader named {kind!r} is already registered; "
                     "pick another name.")
  _LOADERS.append(_Loader(kind, detect_fn, load_fn, description or kind))


def registered_loaders() -> tuple[str, ...]:
  """Returns the registered format names in detection order."""
  return tuple(loader.kind for loader in _LOADERS)


def detect_format(path: str) -> str | None:
  """Returns the name of the first format whose detect function accepts `path`."""
  for loader in _LOADERS:
    if loader.detect(path):
      return loader.kind
  return None


def load_model(path: str | os.PathLike[str],
               config: T5Config | None = None) -> tuple[T5Config, Params]:
  """Loads a T5 config and parameters from a checkpoint directory of any format.

  Args:
    path: a Hugging Face directory, a T5X model or checkpoint directory, or a
      directory of a format added with `register_loader`.
    config: the model config to load into. When given, the checkpoint must match
      its architecture fields (an error names the first field that differs), and
      its other fields (dtype, scan_layers, remat, adapters) are kept. Adapter and
      LoRA parameters are never in a base checkpoint, so params then hold the base
      weights only and the trainer initializes the rest.

  Returns:
    (config, params) with params as a nested dict of float32 numpy arrays.

  Raises:
    CheckpointError: `path` is missing, matches no format, or does not fit `config`.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"Checkpoint path {path} does not exist.")
  for loader in _LOADERS:
    if loader.detect(path):
      logging.info("Loading %s checkpoint from %s", loader.kind, path)
      return loader.load(path, config)
  looked_for = "\n".join(f"  - {loader.kind}: {loader.description}" for loader in _LOADERS)
  raise CheckpointError(
      f"{path} is not a checkpoint directory of any known format. Looked for:\n"
      f"{looked_for}\nPass the directory that contains these files.")


def base_config(config: T5Config) -> T5Config:
  """Returns `config` without adapters or LoRA: the layout of a base checkpoint."""
  return dataclasses.replace(config, adapter=None, lora=None)


def check_same_architecture(config: T5Config, checkpoint_config: T5Config,
                            source: str) -> None:
  """Raises CheckpointError when the configs differ in an architecture field."""
  for field in ARCHITECTURE_FIELDS:
    expected = getattr(config, field)
    found = getattr(checkpoint_config, field)
    if expected != found:
      raise CheckpointError(
          f"The checkpoint {source} has {field}={found!r} but the model config has "
          f"{field}={expected!r}. Use a config that matches the checkpoint, or a "
          "checkpoint of the model you configured.")


def expected_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
  """Returns the `/`-joined parameter names and shapes that `config` builds.

  The shapes come from tracing the model's init abstractly (no arrays are
  allocated), so they follow the model code, including scanned layers, adapters
  and LoRA.
  """
  variables = nn.meta.unbox(t5.abstract_variables(config))
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  return {name: tuple(value.shape) for name, value in flat.items()}


def flatten_params(params: Params) -> dict[str, Any]:
  """Flattens a nested parameter dict into `/`-joined names."""
  return traverse_util.flatten_dict(_unfreeze(params), sep="/")


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Rebuilds the nested parameter dict from `/`-joined names."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def to_numpy(params: Params) -> dict[str, Any]:
  """Copies a parameter tree to host memory as float32 numpy arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), _unfreeze(params))


def check_param_shapes(expected: Mapping[str, tuple[int, ...]],
                       found: Mapping[str, tuple[int, ...]], *, source: str,
                       hint: str = "") -> None:
  """Compares parameter names and shapes and raises on any difference.

  Args:
    expected: name -> shape the model needs.
    found: name -> shape the checkpoint has.
    source: the checkpoint, as it should appear in the message.
    hint: a sentence appended to the message, such as what to do.

  Raises:
    CheckpointError: listing every missing and unexpected name, or else each
      parameter whose shape differs, with both shapes.
  """
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  if missing or unexpected:
    lines = [f"The parameters of {source} do not match the model."]
    if missing:
      lines.append(f"Missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(f"Unexpected ({len(unexpected)}): {', '.join(unexpected)}")
    if hint:
      lines.append(hint)
    raise CheckpointError("\n".join(lines))
  # Shallow names first: the embedding and norms show a width change most plainly.
  wrong = [name for name in sorted(expected, key=lambda n: (n.count("/"), n))
           if tuple(found[name]) != tuple(expected[name])]
  if wrong:
    lines = [f"{len(wrong)} parameters of {source} have the wrong shape:"]
    lines += [f"  {name}: checkpoint {tuple(found[name])}, model expects "
              f"{tuple(expected[name])}" for name in wrong[:_MAX_LISTED]]
    if len(wrong) > _MAX_LISTED:
      lines.append(f"  ... and {len(wrong) - _MAX_LISTED} more")
    if hint:
      lines.append(hint)
    raise CheckpointError("\n".join(lines))


def check_compatible(config: T5Config, params: Params, vocab_size: int | None = None,
                     *, source: str = "the checkpoint", vocab_pad_multiple: int = 128) -> None:
  """Checks that `params` fit `config` and, optionally, a vocabulary size.

  Args:
    config: the model config the parameters are meant for.
    params: nested parameter dict (arrays or anything with `.shape`).
    vocab_size: the vocabulary size of the task data, or None to skip this check.
      The embedding may have more rows than the vocabulary has pieces, up to the
      next multiple of `vocab_pad_multiple` (T5 pads 32100 pieces to 32128 rows).
    source: how the parameters are named in error messages.
    vocab_pad_multiple: the row padding allowed beyond `vocab_size`.

  Raises:
    CheckpointError: naming the parameter and both shapes on any mismatch.
  """
  found = {name: tuple(np.shape(value)) for name, value in flatten_params(params).items()}
  if vocab_size is not None:
    embedding = found.get("token_embedder/embedding")
    padded = -(-vocab_size // vocab_pad_multiple) * vocab_pad_multiple
    if embedding is not None and not vocab_size <= embedding[0] <= padded:
      allowed = ((vocab_size,) + embedding[1:] if padded == vocab_size else
                 f"{(vocab_size,) + embedding[1:]} to {(padded,) + embedding[1:]}")
      raise CheckpointError(
          f"Parameter token_embedder/embedding of {source} has shape {embedding}, but "
          f"a vocabulary of {vocab_size} pieces needs shape {allowed}. Use the "
          "vocabulary the checkpoint was trained with.")
  expected = expected_shapes(config)
  adapter_names = {n for n in expected if _is_adapter_param(n)}
  if not any(n in found for n in adapter_names):
    # A base checkpoint: compare it with the base model.
    expected = {n: s for n, s in expected.items() if n not in adapter_names}
  check_param_shapes(
      expected, found, source=source,
      hint="The checkpoint is for another base model or another config.")


def _is_adapter_param(name: str) -> bool:
  parts = name.split("/")
  return any(p.endswith("_adapter") for p in parts) or parts[-1] in ("lora_a", "lora_b")


def _unfreeze(params: Params) -> dict[str, Any]:
  if hasattr(params, "unfreeze"):
    return params.unfreeze()
  return {k: _unfreeze(v) if isinstance(v, Mapping) else v for k, v in params.items()}


def _detect_hf(path: str) -> bool:
  from elm_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  return hf.is_hf_dir(path)


def _load_hf(path: str, config: T5Config | None) -> tuple[T5Config, Params]:
  from elm_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  return hf.load_hf(path, config=config)


def _detect_t5x(path: str) -> bool:
  from elm_jax.checkpoints import t5x  # pylint: disable=g-import-not-at-top
  return t5x.is_t5x_dir(path)


def _load_t5x(path: str, config: T5Config | None) -> tuple[T5Config, Params]:
  from elm_jax.checkpoints import t5x  # pylint: disable=g-import-not-at-top
  return t5x.load_t5x(path, config=config)


# hf.py and t5x.py import this module, so the built-in loaders import them lazily.
register_loader(
    "hf", _detect_hf, _load_hf,
    description="a Hugging Face T5 directory: config.json with model.safetensors, "
    "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")
register_loader(
    "t5x", _detect_t5x, _load_t5x,
    description="a T5X checkpoint: checkpoint_<step>/checkpoint (msgpack), or a model "
    "directory holding checkpoint_<step> folders")

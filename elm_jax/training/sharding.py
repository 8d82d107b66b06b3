"""The mesh, the shardings of the train state, and global batches.

Parameters are sharded by their logical axis names through the rules of
`elm_jax.partitioning`. Optimizer-state leaves are matched to the parameter
they belong to by tree path (optax states mirror the parameter tree) and take
its sharding; a factored leaf (Adafactor's row and column statistics) drops the
sharding of the dimension that was reduced.
"""

import dataclasses
from typing import Any, Mapping

from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import numpy as np

from elm_jax import partitioning

PartitionSpec = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh of a run.

  Attributes:
    data: size of the data-parallel axis; -1 takes all devices not used by `model`.
    model: size of the model-parallel axis.
    num_devices: use only the first `num_devices` devices (None: all of them).
    rules: logical axis rules; None uses `partitioning.DEFAULT_RULES`.
  """
  data: int = -1
  model: int = 1
  num_devices: int | None = None
  rules: tuple[tuple[str, str | None], ...] | None = None

  def build(self) -> jax.sharding.Mesh:
    devices = jax.devices()
    if self.num_devices is not None:
      if not 1 <= self.num_devices <= len(devices):
        raise ValueError(f"MeshConfig.num_devices={self.num_devices} but {len(devices)} "
                         "devices are available.")
      devices = devices[:self.num_devices]
    data = self.data
    if data == -1:
      if len(devices) % self.model:
        raise ValueError(f"MeshConfig.model={self.model} does not divide the "
                         f"{len(devices)} devices.")
      data = len(devices) // self.model
    return partitioning.make_mesh(data, self.model, devices)

  @property
  def axis_rules(self) -> tuple[tuple[str, str | None], ...]:
    return tuple(self.rules) if self.rules is not None else partitioning.DEFAULT_RULES


def _flat_by_path(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(dict(tree))


def _dict_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _derived_spec(param_shape: tuple[int, ...], spec: PartitionSpec,
                  leaf_shape: tuple[int, ...]) -> PartitionSpec:
  """The spec of an optimizer leaf from the spec of its parameter."""
  axes = tuple(spec) + (None,) * (len(param_shape) - len(tuple(spec)))
  if tuple(leaf_shape) == tuple(param_shape):
    return PartitionSpec(*axes)
  if len(leaf_shape) == len(param_shape) - 1:
    # A factored statistic: one dimension reduced away.
    for dropped in range(len(param_shape)):
      if param_shape[:dropped] + param_shape[dropped + 1:] == tuple(leaf_shape):
        return PartitionSpec(*(axes[:dropped] + axes[dropped + 1:]))
  return PartitionSpec()


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Mapping[str, Any],
                        abstract_params: Mapping[str, Any], mesh: jax.sharding.Mesh) -> Any:
  """Shardings for an optimizer state whose subtrees mirror `abstract_params`."""
  flat_shardings = _flat_by_path(param_shardings)
  flat_params = _flat_by_path(abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def leaf_sharding(path, leaf):
    keys = _dict_keys(path)
    # The parameter path is the longest suffix of the leaf's dict keys that names one.
    for start in range(len(keys)):
      suffix = keys[start:]
      if suffix in flat_params:
        spec = _derived_spec(tuple(flat_params[suffix].shape), flat_shardings[suffix].spec,
                             tuple(leaf.shape))
        return NamedSharding(mesh, spec)
    return replicated

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding
                 ) -> dict[str, jax.Array]:
  """Assemble the processes' local batches into global arrays sharded on `data`."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Fetch a tree of (possibly multi-host sharded) arrays as numpy arrays."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)

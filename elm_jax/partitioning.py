"""Logical axis names, the rules that map them onto the mesh, and mesh creation.

Models name the axes of every parameter and main activation (`embed`, `heads`,
...). This module is the only place that maps those names onto the two mesh
axes `data` and `model`. The default rules follow T5X: the batch is split over
`data`, vocabulary, feed-forward and attention heads over `model`, everything
else is replicated.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "model")

LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "joined_kv", "vocab",
                "relpos_buckets", "layers", "adapter", "lora_rank")

Rules = Sequence[tuple[str, str | None]]

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
    ("layers", None),
    ("adapter", None),
    ("lora_rank", None),
)


def make_mesh(data: int, model: int, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """Builds a `("data", "model")` mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if data < 1 or model < 1 or data * model != len(devices):
    raise ValueError(
        f"Mesh shape data={data} x model={model} needs {data * model} devices, but "
        f"{len(devices)} are available; choose data * model == {len(devices)}.")
  return jax.sharding.Mesh(np.asarray(devices).reshape(data, model), MESH_AXES)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Makes `mesh` and `rules` current, so the models' activation constraints apply.

  Trace (jit) the model inside this context. Outside it the constraints are no-ops.
  """
  _check_rules(rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _check_rules(rules: Rules) -> None:
  for logical, mesh_axis in rules:
    if mesh_axis is not None and mesh_axis not in MESH_AXES:
      raise ValueError(f"Rule ({logical!r}, {mesh_axis!r}) names an unknown mesh axis; "
                       f"use one of {MESH_AXES} or None.")


def logical_to_sharding(logical_spec_tree: Any, mesh: jax.sharding.Mesh,
                        rules: Rules = DEFAULT_RULES) -> Any:
  """Maps a tree of logical `PartitionSpec`s to a tree of `NamedSharding`s."""
  _check_rules(rules)
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


def _fit_to_shape(spec: jax.sharding.PartitionSpec, shape: tuple[int, ...],
                  mesh: jax.sharding.Mesh, where: str) -> jax.sharding.PartitionSpec:
  """Replicates the dimensions that the mesh axes assigned to them do not divide."""
  fitted = []
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if names and size % ways:
      logging.info("Replicating dimension %d (size %d) of %s: not divisible by mesh "
                   "axes %s (%d ways).", dim, size, where, names, ways)
      fitted.append(None)
    else:
      fitted.append(axes)
  return jax.sharding.PartitionSpec(*fitted)


def params_shardings(abstract_variables: Any, mesh: jax.sharding.Mesh,
                     rules: Rules = DEFAULT_RULES) -> Any:
  """Returns the NamedSharding tree of boxed variables, e.g. from `jax.eval_shape`.

  The result has the structure of the unboxed tree. A dimension whose size the
  mesh axes do not divide (small test models) is replicated instead of failing.
  """
  _check_rules(rules)
  logical = nn.get_partition_spec(abstract_variables)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shapes = nn.meta.unbox(abstract_variables)
  paths_and_specs = jax.tree_util.tree_flatten_with_path(
      mesh_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  shape_leaves, treedef = jax.tree_util.tree_flatten(shapes)
  if len(shape_leaves) != len(paths_and_specs):
    raise ValueError("Invalid variables: their partition specs differ in structure; pass "
                     "the boxed tree from init or jax.eval_shape, not an unboxed one.")
  shardings = []
  for (path, spec), leaf in zip(paths_and_specs, shape_leaves):
    where = jax.tree_util.keystr(path)
    fitted = _fit_to_shape(spec, tuple(leaf.shape), mesh, where)
    shardings.append(jax.sharding.NamedSharding(mesh, fitted))
  return jax.tree_util.tree_unflatten(treedef, shardings)


def logical_axes_of(abstract_variables: Any) -> Any:
  """Returns the tree of logical `PartitionSpec`s (empty for unannotated leaves)."""
  return nn.get_partition_spec(abstract_variables)


def data_sharding(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES
                  ) -> jax.sharding.NamedSharding:
  """Returns the sharding of a batch array: leading axis `batch`, the rest replicated."""
  return logical_to_sharding(jax.sharding.PartitionSpec("batch"), mesh, rules)

"""Build the partitioned step-0 train state: random or from an initial checkpoint.

Parameters are created directly in their shardings (jit with `out_shardings`),
so no device ever holds the whole model unless the rules replicate it. With an
initial checkpoint, its parameters replace the random ones by name; parameters
the checkpoint lacks (adapters, LoRA) keep their fresh initialization.
"""

import dataclasses
from typing import Any

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np
import optax

from elm_jax import partitioning
from elm_jax.checkpoints import experts
from elm_jax.checkpoints import loading
from elm_jax.models import t5
from elm_jax.training import checkpointing  # pylint: disable=unused-import  (registers "orbax")
from elm_jax.training import optimizers
from elm_jax.training import sharding as sharding_lib
from elm_jax.training import train_state as train_state_lib


@dataclasses.dataclass(frozen=True)
class Setup:
  """The initialized state and what was learned while building it.

  Attributes:
    state: the step-0 `TrainState`, sharded.
    state_shardings: a `TrainState` of `NamedSharding`s.
    mask: the trainable mask (nested dict of bools like the parameters).
    base_fingerprint: `experts.fingerprint` of the base parameters (adapter and
      LoRA parameters excluded), which experts of this run are tied to.
    num_params: number of model parameters.
  """
  state: train_state_lib.TrainState
  state_shardings: train_state_lib.TrainState
  mask: dict[str, Any]
  base_fingerprint: str
  num_params: int


def is_adapter_or_lora(path: tuple[str, ...]) -> bool:
  return optimizers.is_adapter(path) or optimizers.is_lora(path)


def base_params(params: dict[str, Any]) -> dict[str, Any]:
  """The parameters of the base model: `params` without adapter and LoRA weights."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not is_adapter_or_lora(k)})


def _load_initial(path: str, model_config: t5.T5Config, abstract_params: dict[str, Any],
                  shardings: dict[str, Any]) -> dict[str, Any]:
  """The checkpoint's parameters, placed in `shardings`, keyed like the model's."""
  _, loaded = loading.load_model(path, model_config)
  flat_loaded = traverse_util.flatten_dict(dict(loaded))
  flat_abstract = traverse_util.flatten_dict(abstract_params)
  flat_shardings = traverse_util.flatten_dict(shardings)
  unknown = sorted("/".join(k) for k in flat_loaded if k not in flat_abstract)
  if unknown:
    raise loading.CheckpointError(
        f"{path} has parameters the model does not: {unknown[:5]}. Use a model config "
        "that matches the checkpoint.")
  missing_base = sorted("/".join(k) for k in flat_abstract
                        if k not in flat_loaded and not is_adapter_or_lora(k))
  if missing_base:
    raise loading.CheckpointError(
        f"{path} lacks base parameters of the model: {missing_base[:5]}.")
  placed = {}
  for key, value in flat_loaded.items():
    expected = flat_abstract[key]
    value = np.asarray(value, dtype=expected.dtype)
    if value.shape != tuple(expected.shape):
      raise loading.CheckpointError(
          f"Parameter {'/'.join(key)} of {path} has shape {value.shape}; the model "
          f"expects {tuple(expected.shape)}.")
    sharding = flat_shardings[key]
    placed[key] = jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i])
  return placed


def initialize(*, model_config: t5.T5Config, optimizer: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, rules: Any, trainable: str,
               train_layer_norms: bool | None, seed: int,
               initial_checkpoint_path: str | None) -> Setup:
  """Create the sharded step-0 state on `mesh`."""
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  abstract_variables = t5.abstract_variables(model_config)
  param_shardings = partitioning.params_shardings(abstract_variables, mesh, rules)["params"]

  def init_fn(rng):
    variables = t5.init_variables(model_config, rng)
    return dict(nn.meta.unbox(variables)["params"])

  # NOTE: partitioning.params_shardings unboxes abstract values, which fails inside
  # partitioning.activate, so only the jitted calls below run inside it.
  with partitioning.activate(mesh, rules):
    abstract_params = jax.eval_shape(init_fn, init_rng)
    params = jax.jit(init_fn, out_shardings=param_shardings)(init_rng)
  params = t5._to_dict(params)  # pylint: disable=protected-access
  if initial_checkpoint_path:
    logging.info("Initializing from %s.", initial_checkpoint_path)
    loaded = _load_initial(initial_checkpoint_path, model_config,
                           t5._to_dict(abstract_params), t5._to_dict(param_shardings))  # pylint: disable=protected-access
    flat = traverse_util.flatten_dict(params)
    flat.update(loaded)
    params = traverse_util.unflatten_dict(flat)
  else:
    logging.info("Initializing random parameters with seed %d.", seed)

  base_fingerprint = experts.fingerprint(sharding_lib.to_host(base_params(params)))
  mask = optimizers.trainable_mask(params, trainable, train_layer_norms=train_layer_norms)
  trainable_params, frozen_params = train_state_lib.split_params(params, mask)
  num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  num_trainable = int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable_params)))
  logging.info("Model: %d parameters, %d trainable (%s).", num_params, num_trainable, trainable)

  # Shardings of the state; the optimizer state's follow its parameters.
  shardings_tree = t5._to_dict(param_shardings)  # pylint: disable=protected-access
  trainable_shardings, frozen_shardings = optimizers.split_trainable(shardings_tree, mask)
  abstract_trainable, _ = optimizers.split_trainable(t5._to_dict(abstract_params), mask)  # pylint: disable=protected-access
  abstract_opt_state = jax.eval_shape(optimizer.init, abstract_trainable)
  opt_shardings = sharding_lib.opt_state_shardings(
      abstract_opt_state, trainable_shardings, abstract_trainable, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shardings = train_state_lib.TrainState(
      step=replicated, trainable=trainable_shardings, frozen=frozen_shardings,
      opt_state=opt_shardings, rng=replicated)

  create = jax.jit(
      lambda t, f, r: train_state_lib.create_train_state(
          trainable=t, frozen=f, optimizer=optimizer, rng=r),
      out_shardings=state_shardings)
  state = create(trainable_params, frozen_params, dropout_rng)
  return Setup(state=state, state_shardings=state_shardings, mask=mask,
               base_fingerprint=base_fingerprint, num_params=num_params)

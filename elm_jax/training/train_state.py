"""The train state: parameters split into trainable and frozen parts.

Parameter-efficient training (adapters, LoRA) differentiates and optimizes only the
trainable leaves; the frozen leaves are carried through the step untouched, so
they stay bitwise equal to the initial checkpoint and the optimizer keeps no
state for them. Full fine-tuning is the case where the frozen part is empty.

Trees are the model's nested parameter dicts. `split_params` and `merge_params`
convert between the full tree and the two disjoint subtrees.
"""

from typing import Any, Mapping

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp

from elm_jax.training import optimizers

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes, plus the frozen parameters it reads.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied.
    trainable: the trainable parameters (a nested dict).
    frozen: the frozen parameters (a nested dict, possibly empty).
    opt_state: the optimizer state of `trainable`.
    rng: uint32 [2], the base PRNG key; the step's dropout key is
      `fold_in(rng, step)`, so restoring `rng` and `step` restores the stream.
  """
  step: jax.Array
  trainable: PyTree
  frozen: PyTree
  opt_state: PyTree
  rng: jax.Array

  @property
  def params(self) -> PyTree:
    """The full parameter tree."""
    return merge_params(self.trainable, self.frozen)


def split_params(params: PyTree, mask: PyTree) -> tuple[dict[str, Any], dict[str, Any]]:
  """Split `params` into (trainable, frozen) nested dicts by a boolean `mask` tree.

  Raises:
    ValueError: `mask` does not match `params`, or selects no parameter at all.
  """
  trainable, frozen = optimizers.split_trainable(flax.core.unfreeze(params),
                                                 flax.core.unfreeze(mask))
  if not jax.tree.leaves(trainable):
    raise ValueError(
        "The trainable mask selects no parameter: check that the model config has "
        "adapters or LoRA when training with trainable='adapter' or 'lora'.")
  return trainable, frozen


merge_params = optimizers.merge_params


def flat_names(tree: Mapping[str, Any]) -> list[str]:
  """The `/`-joined paths of a nested dict's leaves, sorted."""
  return sorted("/".join(k) for k in traverse_util.flatten_dict(dict(tree)))


def create_train_state(*, trainable: PyTree, frozen: PyTree, optimizer: Any,
                       rng: jax.Array) -> TrainState:
  """A step-0 state; call under `jax.jit` to place the optimizer state."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      trainable=trainable,
      frozen=frozen,
      opt_state=optimizer.init(trainable),
      rng=rng)

"""Optimizers, learning-rate schedules and trainable-parameter masks, built on optax.

The method's settings, as gin would bind them:

- prompt experts: `adamw(learning_rate=linear_decay(1e-4, total_steps=N))`,
  mode "adapter" (adapters and layer norms train; everything else is frozen);
- dataset experts: `adafactor(learning_rate=constant(1e-4))`, mode "full";
- multitask model: `adafactor(learning_rate=constant(1e-3))`, mode "full".

Two ways to keep frozen parameters frozen:

1. `make_optimizer(base, mask=trainable_mask(params, mode))` labels every leaf,
   and frozen leaves get zero updates and no optimizer state (optax's
   `multi_transform` stores an empty `MaskedNode` for them). Gradients are still
   computed for the whole tree.
2. `split_trainable(params, mask)` gives `(trainable, frozen)`. The train step
   differentiates the loss with respect to `trainable` only and calls
   `merge_params(trainable, frozen)` inside the loss, and the optimizer updates
   only `trainable`. This also skips the frozen weights' gradient buffers and
   is what adapter training should use (see benchmarks/adapter_vs_full.py).

Gradient accumulation: `make_optimizer(..., accumulation_steps=k)` wraps the
optimizer in `optax.MultiSteps`, which averages the gradients of k calls and
applies one update on the k-th (earlier calls return zero updates). Each call
then counts as a train step, so a run with k-step accumulation makes k times as
many calls as optimizer updates, and schedules count updates. A train step that
loops over microbatches inside one jitted call (one update per call) is the
alternative when the trainer prefers one call per update.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any, Literal

from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

PyTree = Any
LearningRate = float | optax.Schedule

TRAINABLE = "trainable"
FROZEN = "frozen"
MODES = ("full", "adapter", "lora")
Mode = Literal["full", "adapter", "lora"]


# ---------------------------------------------------------------------------
# Learning-rate schedules. Each takes the optimizer's update count (0 for the
# first update) and returns a float32 learning rate.


def constant(value: float) -> optax.Schedule:
  """Return the schedule `value` at every step."""
  return optax.constant_schedule(value)


def linear_decay(peak: float,
                 total_steps: int,
                 warmup_steps: int = 0,
                 end_value: float = 0.0) -> optax.Schedule:
  """Return linear warmup from 0 to `peak`, then linear decay to `end_value`.

  lr(step) = peak * step / warmup_steps                          if step < warmup_steps
           = peak + (end_value - peak) * (step - warmup_steps) / (total_steps - warmup_steps)
  clipped at `end_value` after `total_steps`. This is the shape of Hugging Face's
  `get_linear_schedule_with_warmup`.
  """
  if total_steps <= warmup_steps:
    raise ValueError(
        f"linear_decay needs total_steps > warmup_steps; got total_steps={total_steps}, "
        f"warmup_steps={warmup_steps}.")
  if warmup_steps < 0:
    raise ValueError(f"linear_decay: warmup_steps={warmup_steps} must be >= 0.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = peak * step / max(warmup_steps, 1)
    fraction = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    decay = peak + (end_value - peak) * fraction
    return jnp.where(step < warmup_steps, warmup, decay)

  return schedule


def warmup_then_rsqrt(peak: float,
                      warmup_steps: int,
                      linear_warmup: bool = False) -> optax.Schedule:
  """Return T5's inverse square root schedule.

  lr(step) = peak * sqrt(warmup_steps / max(step, warmup_steps)), multiplied by
  min(1, step / warmup_steps) when `linear_warmup`. Without linear warmup this is
  T5's pretraining schedule `1 / sqrt(max(step, warmup_steps))` scaled so that
  the rate is `peak` up to `warmup_steps`: T5's 10,000-step form is
  `warmup_then_rsqrt(peak=0.01, warmup_steps=10_000)`.
  """
  if warmup_steps <= 0:
    raise ValueError(f"warmup_then_rsqrt: warmup_steps={warmup_steps} must be > 0.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = peak * jnp.sqrt(warmup_steps / jnp.maximum(step, warmup_steps))
    if linear_warmup:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    return lr

  return schedule


# ---------------------------------------------------------------------------
# Optimizers.


def adafactor(learning_rate: LearningRate = 1e-3,
              *,
              decay_rate: float = 0.8,
              clipping_threshold: float | None = 1.0,
              momentum: float | None = None,
              factored: bool = True,
              min_dim_size_to_factor: int = 128,
              multiply_by_parameter_scale: bool = True,
              epsilon: float = 1e-30,
              weight_decay_rate: float | None = None) -> optax.GradientTransformation:
  """Return Adafactor with T5X's defaults (through `optax.adafactor`).

  Factored second moments for matrices whose two dimensions are both at least
  `min_dim_size_to_factor`, second-moment decay step^-0.8, no momentum, update
  clipping at RMS 1.0 and updates scaled by each parameter's RMS. The learning
  rate is the given float or schedule: there is no relative step size. Hugging
  Face's `Adafactor(scale_parameter=False, relative_step=False)` corresponds to
  `multiply_by_parameter_scale=False`.
  """
  return optax.adafactor(
      learning_rate=learning_rate,
      min_dim_size_to_factor=min_dim_size_to_factor,
      decay_rate=decay_rate,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold,
      momentum=momentum,
      eps=epsilon,
      factored=factored,
      weight_decay_rate=weight_decay_rate)


def adamw(learning_rate: LearningRate = 1e-4,
          *,
          b1: float = 0.9,
          b2: float = 0.999,
          eps: float = 1e-8,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Return AdamW (decoupled weight decay, applied to every trainable leaf).

  The defaults are PyTorch's Adam constants with no weight decay, as Hugging
  Face's `AdamW` uses by default. optax's own default decay is 1e-4.
  """
  return optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                     weight_decay=weight_decay)


def make_optimizer(base: optax.GradientTransformation,
                   *,
                   mask: PyTree | None = None,
                   clip_norm: float | None = None,
                   accumulation_steps: int = 1) -> optax.GradientTransformation:
  """Wrap `base` with global-norm clipping, accumulation and a frozen mask.

  Args:
    base: the optimizer, e.g. `adamw(...)` or `adafactor(...)`.
    mask: a tree of bools like the parameters (`trainable_mask`); False leaves
      get zero updates and hold no optimizer state. None trains every leaf.
    clip_norm: clip gradients to this global L2 norm, computed over the
      trainable leaves only. None disables clipping.
    accumulation_steps: average the gradients of this many calls before one
      update (`optax.MultiSteps`); 1 disables accumulation.

  Returns:
    The combined transformation; call `update(grads, state, params)` with the
    parameters (Adafactor and AdamW's weight decay read them).
  """
  if accumulation_steps < 1:
    raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1.")
  if clip_norm is not None and clip_norm <= 0:
    raise ValueError(f"clip_norm={clip_norm} must be positive or None.")

  transform = base
  if clip_norm is not None:
    transform = optax.chain(optax.clip_by_global_norm(clip_norm), transform)
  if accumulation_steps > 1:
    transform = optax.MultiSteps(transform, every_k_schedule=accumulation_steps)
    transform = transform.gradient_transformation()
  if mask is None:
    return transform
  labels = jax.tree.map(lambda trainable: TRAINABLE if trainable else FROZEN, mask)
  return optax.multi_transform({TRAINABLE: transform, FROZEN: optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------
# Trainable-parameter masks.


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """Return the dict keys along a tree path, skipping attribute keys of boxes."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
  return tuple(names)


def is_layer_norm(names: tuple[str, ...]) -> bool:
  """True for T5's RMS layer norm scales, e.g. `.../pre_mlp_layer_norm/scale`."""
  return len(names) >= 2 and names[-1] == "scale" and names[-2].endswith("norm")


def is_adapter(names: tuple[str, ...]) -> bool:
  """True for bottleneck adapter weights (`..._adapter/{down,up}/kernel`)."""
  return any(name.endswith("_adapter") for name in names)


def is_lora(names: tuple[str, ...]) -> bool:
  """True for LoRA factors (`.../<projection>/lora_a` and `lora_b`)."""
  return bool(names) and names[-1] in ("lora_a", "lora_b")


def trainable_mask(params: PyTree,
                   mode: Mode,
                   *,
                   train_layer_norms: bool | None = None) -> PyTree:
  """Return a tree of bools like `params`: True where a parameter trains.

  Args:
    params: the model parameters (with or without a top-level "params" key;
      flax partitioning boxes are looked through).
    mode: "full" (everything), "adapter" (adapter weights) or "lora" (LoRA
      factors). Embeddings, relative position biases, attention and MLP kernels
      and `logits_dense` are frozen in the last two.
    train_layer_norms: also train every layer norm scale. None takes the
      mode's default: True for "adapter" (as `AdapterConfig.train_layer_norms`),
      False for "lora".

  Raises:
    ValueError: `mode` is unknown, or the tree has no adapter (LoRA) weights
      for mode "adapter" ("lora"), which means the model config lacks them.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown trainable mode {mode!r}; expected one of {MODES}.")
  if train_layer_norms is None:
    train_layer_norms = mode == "adapter"

  def rule(path, _):
    names = _names(path)
    if mode == "full":
      return True
    if train_layer_norms and is_layer_norm(names):
      return True
    return is_adapter(names) if mode == "adapter" else is_lora(names)

  is_leaf = lambda x: isinstance(x, jax.Array) or hasattr(x, "shape")
  mask = jax.tree_util.tree_map_with_path(rule, params, is_leaf=is_leaf)

  if mode != "full":
    kind = is_adapter if mode == "adapter" else is_lora
    found = any(kind(_names(path)) for path, _ in
                jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0])
    if not found:
      config_field = "adapter=AdapterConfig(...)" if mode == "adapter" else "lora=LoraConfig(...)"
      raise ValueError(
          f"trainable mode {mode!r}, but the parameters contain no {mode} weights. "
          f"Build the model with T5Config({config_field}) or use mode 'full'.")
  return mask


def _flatten(tree: PyTree) -> dict[tuple[str, ...], Any]:
  if not isinstance(tree, Mapping):
    raise TypeError(f"Expected a nested mapping of parameters, got {type(tree).__name__}.")
  return traverse_util.flatten_dict(tree)


def split_trainable(params: PyTree, mask: PyTree) -> tuple[dict[str, Any], dict[str, Any]]:
  """Split nested-dict `params` into `(trainable, frozen)` nested dicts by `mask`.

  Each output holds only its own leaves (empty subtrees are dropped), so the
  gradient of a loss of `trainable` has the size of the trainable part alone.
  """
  flat_params, flat_mask = _flatten(params), _flatten(mask)
  if flat_params.keys() != flat_mask.keys():
    missing = sorted("/".join(k) for k in flat_params.keys() ^ flat_mask.keys())[:5]
    raise ValueError(f"The mask does not match the parameters; differing keys: {missing}.")
  trainable = {k: v for k, v in flat_params.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat_params.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: PyTree, frozen: PyTree) -> dict[str, Any]:
  """Return the nested dict holding the leaves of both `trainable` and `frozen`."""
  flat_trainable, flat_frozen = _flatten(trainable), _flatten(frozen)
  overlap = flat_trainable.keys() & flat_frozen.keys()
  if overlap:
    names = sorted("/".join(k) for k in overlap)[:5]
    raise ValueError(f"Parameters in both the trainable and the frozen tree: {names}. "
                     "Build the two trees with split_trainable.")
  return traverse_util.unflatten_dict({**flat_frozen, **flat_trainable})


def count_parameters(params: PyTree, mask: PyTree | None = None) -> int:
  """Return the number of scalars in `params`, or in its trainable part."""
  leaves = jax.tree.leaves(params)
  if mask is None:
    return sum(int(x.size) for x in leaves)
  return sum(int(x.size) for x, keep in zip(leaves, jax.tree.leaves(mask)) if keep)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer of a run, as one gin-bindable value.

  Attributes:
    optimizer: e.g. `adamw(...)` or `adafactor(...)`.
    mode: which parameters train ("full", "adapter", "lora").
    train_layer_norms: see `trainable_mask`; None takes the mode's default.
    clip_norm: global gradient norm clip, or None.
    accumulation_steps: calls per update through `optax.MultiSteps`.
  """
  optimizer: optax.GradientTransformation
  mode: Mode = "full"
  train_layer_norms: bool | None = None
  clip_norm: float | None = None
  accumulation_steps: int = 1

  def mask(self, params: PyTree) -> PyTree:
    return trainable_mask(params, self.mode, train_layer_norms=self.train_layer_norms)

  def build(self, *, mask: PyTree | None = None) -> optax.GradientTransformation:
    """Return the transformation; pass `mask` to update the full parameter tree."""
    return make_optimizer(self.optimizer, mask=mask, clip_norm=self.clip_norm,
                          accumulation_steps=self.accumulation_steps)

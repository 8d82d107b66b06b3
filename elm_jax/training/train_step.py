"""The jitted train and eval steps of the T5 encoder-decoder.

Loss normalization: the loss of a step is the sum of the per-token losses
(cross-entropy with label smoothing, plus the z-loss) weighted by
`decoder_loss_weights`, divided by the sum of those weights, i.e. the mean over
the real target tokens of the whole global batch. Gradient accumulation splits
the batch into microbatches inside the step (`lax.scan`), accumulates the
gradients of the weighted sums and divides once at the end, so it computes the
same update as one large batch up to floating-point summation order.
"""

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from elm_jax.models import t5
from elm_jax.training import losses
from elm_jax.training import train_state as train_state_lib

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

# Optional packed-batch features passed to the model when present.
_MODEL_KWARGS = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
                 "decoder_positions")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Attributes:
    label_smoothing: mass spread uniformly over the vocabulary (0 disables).
    z_loss: coefficient of log(Z)^2, T5X's auxiliary loss that keeps the softmax
      normalizer near 1 (0 disables).
  """
  label_smoothing: float = 0.0
  z_loss: float = 1e-4


def _weighted_sums(model: t5.T5, params: Any, batch: Batch, *, loss_config: LossConfig,
                   dropout_rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss sum, {weight_sum, correct_sum, z_loss_sum}) of a batch."""
  kwargs = {k: batch[k] for k in _MODEL_KWARGS if k in batch}
  rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
  logits = model.apply(
      {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], enable_dropout=dropout_rng is not None, rngs=rngs,
      **kwargs)  # [batch, dec_len, vocab] float32
  token_loss = losses.token_cross_entropy(
      logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
      label_smoothing=loss_config.label_smoothing, z_loss=loss_config.z_loss)
  loss_sum = token_loss.loss_sum
  sums = {
      "weight_sum": token_loss.weight_sum,
      "correct_sum": token_loss.correct_sum,
      "z_loss_sum": token_loss.z_loss_sum,
  }
  return loss_sum, sums


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[B, ...] -> [M, B/M, ...], microbatch i taking rows i, i+M, i+2M, ...

  Strided rows keep each microbatch spread over every data-parallel device.
  """
  def split(x):
    rows = x.shape[0]
    if rows % num_microbatches:
      raise ValueError(f"The batch of {rows} rows does not split into "
                       f"{num_microbatches} microbatches; use a batch size divisible by it.")
    x = x.reshape((rows // num_microbatches, num_microbatches) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)  # [M, B/M, ...]
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  return {k: split(v) for k, v in batch.items()}


def make_train_step(*, model: t5.T5, optimizer: optax.GradientTransformation,
                    loss_config: LossConfig, num_microbatches: int = 1,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None
                    ) -> Callable[[train_state_lib.TrainState, Batch],
                                  tuple[train_state_lib.TrainState, Metrics]]:
  """Build `step(state, batch) -> (state, metrics)`; jit it with shardings.

  Only `state.trainable` is differentiated and updated; `state.frozen` is passed
  through untouched.
  """
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches={num_microbatches} must be >= 1.")

  def sums_fn(trainable, frozen, batch, rng):
    params = train_state_lib.merge_params(trainable, frozen)
    return _weighted_sums(model, params, batch, loss_config=loss_config, dropout_rng=rng)

  grad_fn = jax.value_and_grad(sums_fn, has_aux=True)

  def step(state: train_state_lib.TrainState, batch: Batch):
    step_rng = jax.random.fold_in(state.rng, state.step)

    if num_microbatches == 1:
      (loss_sum, sums), grads = grad_fn(state.trainable, state.frozen, batch, step_rng)
    else:
      micro = _split_microbatches(batch, num_microbatches)

      def body(carry, inputs):
        index, microbatch = inputs
        grads_acc, loss_acc, sums_acc = carry
        (loss_i, sums_i), grads_i = grad_fn(state.trainable, state.frozen, microbatch,
                                            jax.random.fold_in(step_rng, index))
        carry = (jax.tree.map(jnp.add, grads_acc, grads_i), loss_acc + loss_i,
                 jax.tree.map(jnp.add, sums_acc, sums_i))
        return carry, None

      zeros = jax.tree.map(jnp.zeros_like, state.trainable)
      zero_sums = {k: jnp.zeros((), jnp.float32) for k in
                   ("weight_sum", "correct_sum", "z_loss_sum")}
      (grads, loss_sum, sums), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), zero_sums),
          (jnp.arange(num_microbatches), micro))

    denominator = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)

    metrics = {
        "loss": loss_sum / denominator,
        "cross_entropy": (loss_sum - sums["z_loss_sum"]) / denominator,
        "z_loss": sums["z_loss_sum"] / denominator,
        "accuracy": sums["correct_sum"] / denominator,
        "target_tokens": sums["weight_sum"],
        "grad_norm": optax.global_norm(grads),
    }
    if learning_rate_fn is not None:
      metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics

  return step


def make_eval_step(*, model: t5.T5, loss_config: LossConfig
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Build `eval_step(params, batch) -> sums` without dropout, for validation loss."""
  def eval_step(params, batch):
    loss_sum, sums = _weighted_sums(model, params, batch, loss_config=loss_config,
                                    dropout_rng=None)
    return {"loss_sum": loss_sum, **sums}
  return eval_step

"""Token cross-entropy for teacher-forced decoder outputs, as T5X computes it."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLoss(NamedTuple):
  """Weighted sums over the tokens of a batch (float32 scalars).

  Sums, not means, so microbatches and devices can be added before dividing.

  Attributes:
    loss_sum: sum of weight * (cross-entropy + z-loss) per token, label
      smoothing included and shifted so that its minimum is 0.
    z_loss_sum: the z-loss part of `loss_sum`.
    weight_sum: sum of the token weights.
    correct_sum: sum of the weights of tokens whose argmax is the target.
  """
  loss_sum: jax.Array
  z_loss_sum: jax.Array
  weight_sum: jax.Array
  correct_sum: jax.Array

  def mean_loss(self) -> jax.Array:
    return self.loss_sum / jnp.maximum(self.weight_sum, 1e-8)

  def accuracy(self) -> jax.Array:
    return self.correct_sum / jnp.maximum(self.weight_sum, 1e-8)


def smoothing_constant(vocab_size: int, label_smoothing: float) -> float:
  """Return the entropy of the smoothed target distribution.

  Subtracting it makes the smoothed cross-entropy 0 at its minimum (logits equal
  to the log of the smoothed targets), as T5X does.
  """
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab_size - 1)
  entropy = -confidence * math.log(confidence) if confidence > 0 else 0.0
  if low_confidence > 0:
    entropy -= (vocab_size - 1) * low_confidence * math.log(low_confidence)
  return entropy


def token_cross_entropy(logits: jax.Array,
                        targets: jax.Array,
                        weights: jax.Array | None = None,
                        *,
                        label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> TokenLoss:
  """Return weighted cross-entropy sums of `logits` against integer `targets`.

  Args:
    logits: [batch, length, vocab], any float dtype; computed in float32.
    targets: int [batch, length].
    weights: [batch, length], usually `decoder_loss_weights` (0 on padding).
      None weighs every token 1, padding included, as T5X does.
    label_smoothing: probability mass spread uniformly over the other
      vocab_size - 1 tokens.
    z_loss: coefficient of log(Z)^2 per token (1e-4 in T5X's configs), which
      keeps the softmax normalizer near 1.

  Returns:
    A `TokenLoss` of sums over all tokens.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} differ in "
                     "[batch, length].")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1).")
  logits = logits.astype(jnp.float32)
  vocab_size = logits.shape[-1]
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)

  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  log_probs = logits - log_z[..., None]  # [batch, length, vocab]
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing > 0:
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    # Soft targets: confidence on the target, low_confidence elsewhere.
    others = jnp.sum(log_probs, axis=-1) - target_log_probs
    token_loss = -(confidence * target_log_probs + low_confidence * others)
    token_loss = token_loss - smoothing_constant(vocab_size, label_smoothing)
  else:
    token_loss = -target_log_probs
  token_z_loss = z_loss * jnp.square(log_z)

  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return TokenLoss(
      loss_sum=jnp.sum((token_loss + token_z_loss) * weights),
      z_loss_sum=jnp.sum(token_z_loss * weights),
      weight_sum=jnp.sum(weights),
      correct_sum=jnp.sum(correct * weights))

"""Tests for elm_jax.training.losses against a numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax.training import losses


def _reference(logits, targets, weights, label_smoothing, z_loss):
  """Cross-entropy against explicit soft target vectors, in float64."""
  logits = logits.astype(np.float64)
  vocab = logits.shape[-1]
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  log_probs = logits - log_z[..., None]
  on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
  soft = np.full(logits.shape, off)
  np.put_along_axis(soft, targets[..., None], on, axis=-1)
  entropy = -np.sum(np.where(soft > 0, soft * np.log(np.where(soft > 0, soft, 1)), 0), -1)
  token = -np.sum(soft * log_probs, -1) - entropy + z_loss * log_z**2
  correct = (logits.argmax(-1) == targets).astype(np.float64)
  return np.sum(token * weights), np.sum(weights), np.sum(correct * weights)


@pytest.fixture
def batch():
  rng = np.random.default_rng(7)
  logits = rng.normal(scale=3.0, size=(3, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  return logits, targets, weights


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (0.2, 1e-2)])
def test_matches_numpy_reference(batch, label_smoothing, z_loss):
  logits, targets, weights = batch
  out = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                   label_smoothing=label_smoothing, z_loss=z_loss)
  loss, weight_sum, correct = _reference(logits, targets, weights, label_smoothing, z_loss)
  np.testing.assert_allclose(out.loss_sum, loss, rtol=1e-5)
  assert float(out.weight_sum) == weight_sum
  assert float(out.correct_sum) == correct


def test_z_loss_reported_separately(batch):
  logits, targets, weights = batch
  out = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                   z_loss=1e-4)
  plain = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(out.loss_sum - out.z_loss_sum, plain.loss_sum, rtol=1e-6)
  assert float(out.z_loss_sum) > 0


def test_smoothed_minimum_is_zero():
  vocab, smoothing = 13, 0.1
  targets = np.array([[2, 5, 12]], np.int32)
  soft = np.full((1, 3, vocab), smoothing / (vocab - 1))
  np.put_along_axis(soft, targets[..., None], 1 - smoothing, axis=-1)
  out = losses.token_cross_entropy(jnp.asarray(np.log(soft), jnp.float32), jnp.asarray(targets),
                                   label_smoothing=smoothing)
  assert abs(float(out.loss_sum)) < 1e-5


def test_none_weights_count_every_token(batch):
  logits, targets, _ = batch
  out = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert float(out.weight_sum) == targets.size


def test_bfloat16_logits_computed_in_float32(batch):
  logits, targets, weights = batch
  out = losses.token_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                                   jnp.asarray(weights))
  assert out.loss_sum.dtype == jnp.float32
  reference, _, _ = _reference(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)),
                               targets, weights, 0.0, 0.0)
  np.testing.assert_allclose(out.loss_sum, reference, rtol=1e-5)


def test_accuracy_and_mean(batch):
  logits, targets, weights = batch
  out = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  assert float(out.accuracy()) == pytest.approx(float(out.correct_sum / out.weight_sum))
  assert float(out.mean_loss()) == pytest.approx(float(out.loss_sum / out.weight_sum))


def test_shape_mismatch_rejected(batch):
  logits, targets, _ = batch
  with pytest.raises(ValueError, match="differ"):
    losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets[:, :4]))

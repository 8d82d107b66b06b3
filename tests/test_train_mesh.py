"""One device and an 8-device CPU mesh train the same; a NaN loss stops the run."""

import numpy as np
import pytest

from elm_jax.models import t5
from elm_jax.training import checkpointing
from elm_jax.training import metrics
from elm_jax.training import optimizers
from elm_jax.training import sharding
from elm_jax.training import trainer
from tests import train_fixtures

STEPS = 8


def _config() -> t5.T5Config:
  return t5.T5Config(vocab_size=train_fixtures.vocab_size(), d_model=24, d_kv=5, d_ff=37,
                     num_heads=3, num_encoder_layers=2, num_decoder_layers=1,
                     dropout_rate=0.0)


def _train(model_dir, mesh, **overrides):
  kwargs = dict(
      model_config=_config(), task_name=train_fixtures.TASK,
      feature_lengths={"inputs": 48, "targets": 8}, model_dir=str(model_dir), batch_size=8,
      optimizer=optimizers.adamw, learning_rate=3e-3, train_steps=STEPS, mesh=mesh,
      checkpoint=checkpointing.CheckpointConfig(period=3, async_save=False),
      evaluation=trainer.EvalConfig(period=-1), expert=None, seed=3)
  kwargs.update(overrides)
  return trainer.train(**kwargs)


def test_one_and_eight_devices_same_losses(tmp_path):
  one = _train(tmp_path / "one", sharding.MeshConfig(num_devices=1))
  eight = _train(tmp_path / "eight", sharding.MeshConfig(data=4, model=2),
                 num_microbatches=2)
  assert [s for s, _ in one.losses] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in eight.losses], [l for _, l in one.losses],
                             rtol=2e-4)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
  model_dir = tmp_path / "nan"
  with pytest.raises(metrics.NonFiniteLossError) as error:
    _train(model_dir, sharding.MeshConfig(),
           batch_transform=train_fixtures.nan_loss_weights_at(5))
  message = str(error.value)
  assert "step 5" in message
  assert "step 3" in message
  assert train_fixtures.checkpoint_steps(model_dir) == [3]
  params = train_fixtures.read_params(model_dir, 3)
  assert all(np.isfinite(v).all() for v in params.values())


def test_validation_scores_and_exports_best(tmp_path):
  from elm_jax.checkpoints import experts  # pylint: disable=g-import-not-at-top
  from elm_jax.training import export  # pylint: disable=g-import-not-at-top
  result = _train(
      tmp_path / "validated", sharding.MeshConfig(),
      evaluation=trainer.EvalConfig(period=4, max_batches=2, score_max_examples=12),
      checkpoint=checkpointing.CheckpointConfig(period=4, best_metric="eval/loss",
                                                best_mode="min", export_from="best"),
      expert=export.ExpertSettings(kind="dataset"))
  assert [step for step, _ in result.eval_history] == [4, 8]
  for _, results in result.eval_history:
    assert set(results) >= {"eval/loss", "eval/accuracy"}
    assert 0.0 <= results["eval/accuracy"] <= 1.0
  best_step, best_metrics = min(result.eval_history, key=lambda item: item[1]["eval/loss"])
  assert sorted(p.name for p in (tmp_path / "validated" / "best").iterdir()
                if p.name.isdigit()) == [str(best_step)]
  metadata = experts.load_metadata(result.expert_dir)
  assert metadata.validation_metrics == best_metrics

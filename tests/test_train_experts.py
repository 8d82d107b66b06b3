"""Tiny dataset-expert, prompt-expert and multitask runs on real BIG-bench data."""

import json

import numpy as np
import pytest
import seqio

from elm_jax.checkpoints import experts
from elm_jax.training import optimizers
from tests import train_fixtures

STEPS = 24


@pytest.fixture(scope="module")
def model_gin(tmp_path_factory):
  return train_fixtures.write_tiny_model_gin(tmp_path_factory.mktemp("gin"))


@pytest.fixture(scope="module")
def dataset_expert_run(model_gin, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("dataset_expert")
  result = train_fixtures.run_in_process(train_fixtures.train_argv(
      model_gin, model_dir, experiment="experiments/dataset_expert.gin", steps=STEPS,
      extra=["--gin.LEARNING_RATE=0.01", "--gin.CHECKPOINT_PERIOD=10"]))
  return model_dir, result


def _expert_names(expert_dir):
  _, params = experts.load_expert(expert_dir)
  return set(experts.flatten_params(params))


def test_dataset_expert_loss_falls(dataset_expert_run):
  _, result = dataset_expert_run
  assert len(result.losses) == STEPS
  assert train_fixtures.mean_loss(result.losses, slice(-5, None)) < \
      train_fixtures.mean_loss(result.losses, slice(0, 5)) - 0.5


def test_dataset_expert_holds_all_params(dataset_expert_run):
  model_dir, result = dataset_expert_run
  params = train_fixtures.read_params(model_dir, STEPS)
  assert _expert_names(result.expert_dir) == set(params)
  metadata = experts.load_metadata(result.expert_dir)
  assert (metadata.kind, metadata.trainable, metadata.steps) == ("dataset", "full", STEPS)
  assert metadata.task == train_fixtures.TASK
  assert len(metadata.data_hash) == 64


def test_prompt_expert_freezes_base(dataset_expert_run, model_gin, tmp_path):
  base_dir, _ = dataset_expert_run
  base = train_fixtures.read_params(base_dir, STEPS)
  model_dir = tmp_path / "prompt_expert"
  result = train_fixtures.run_in_process(train_fixtures.train_argv(
      model_gin, model_dir, experiment="experiments/prompt_expert.gin", steps=STEPS,
      extra=[f"--gin.INITIAL_CHECKPOINT_PATH='{base_dir}'", "--gin.LEARNING_RATE=0.01",
             "--gin.ADAPTER_REDUCTION_FACTOR=3", "--gin.EXPERT_PROMPT='zero_shot'"]))

  # Loss falls.
  assert train_fixtures.mean_loss(result.losses, slice(-5, None)) < \
      train_fixtures.mean_loss(result.losses, slice(0, 5))

  # Frozen parameters are bitwise those of the base; trainable ones moved.
  final = train_fixtures.read_params(model_dir, STEPS)
  trainable = {n for n in final if optimizers.is_adapter(tuple(n.split("/")))
               or optimizers.is_layer_norm(tuple(n.split("/")))}
  frozen = set(final) - trainable
  assert frozen and frozen <= set(base)
  for name in sorted(frozen):
    np.testing.assert_array_equal(final[name], base[name], err_msg=name)
  changed = [n for n in trainable if n in base and not np.array_equal(final[n], base[n])]
  assert changed, "no layer norm changed"

  # The expert holds exactly the trainable parameters and names the base.
  assert _expert_names(result.expert_dir) == trainable
  metadata = experts.load_metadata(result.expert_dir)
  assert (metadata.kind, metadata.trainable, metadata.prompt) == ("prompt", "adapter", "zero_shot")
  assert metadata.adapter == {"reduction_factor": 3, "train_layer_norms": True}
  base_tree = {k: v for k, v in base.items()}
  assert metadata.base_fingerprint == experts.fingerprint(base_tree)
  assert "experiments/prompt_expert.gin" in metadata.gin_config or "linear_decay" in metadata.gin_config


def test_expert_on_other_base_names_both(dataset_expert_run, tmp_path):
  _, result = dataset_expert_run
  metadata = experts.load_metadata(result.expert_dir)
  other = {"token_embedder": {"embedding": np.zeros((3, 5), np.float32)}}
  with pytest.raises(experts.BaseMismatchError) as error:
    experts.load_expert(result.expert_dir, base_params=other)
  assert metadata.base_fingerprint in str(error.value)
  assert experts.fingerprint(other) in str(error.value)


def test_multitask_packed_mixture(model_gin, tmp_path):
  import elm_jax.tasks.bigbench  # pylint: disable=unused-import,g-import-not-at-top
  name = "test_train_multitask_mixture"
  if name not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(name, ["bigbench_emoji_movie", "bigbench_cause_and_effect_one_sentence",
                                     "bigbench_timedial"], default_rate=1.0)
  model_dir = tmp_path / "multitask"
  result = train_fixtures.run_in_process(train_fixtures.train_argv(
      model_gin, model_dir, experiment="experiments/mt_baseline.gin", steps=STEPS,
      extra=[f"--gin.MIXTURE_OR_TASK_NAME='{name}'", "--gin.LEARNING_RATE=0.01",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 16}"]))
  assert train_fixtures.mean_loss(result.losses, slice(-5, None)) < \
      train_fixtures.mean_loss(result.losses, slice(0, 5)) - 0.5
  metadata = json.loads((model_dir / "expert" / "expert.json").read_text())
  assert (metadata["kind"], metadata["task"]) == ("multitask", name)
  assert metadata["model_config"]["dropout_rate"] == 0.1


def test_infer_decodes_trained_model(dataset_expert_run, tmp_path):
  model_dir, _ = dataset_expert_run
  output = tmp_path / "predictions.jsonl"
  path = train_fixtures.run_in_process([
      "--gin_file=runs/infer.gin", f"--gin.MIXTURE_OR_TASK_NAME='{train_fixtures.TASK}'",
      f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.INFER_OUTPUT_PATH='{output}'",
      f"--gin.TASK_FEATURE_LENGTHS={train_fixtures.LENGTHS}", "--gin.MAX_EXAMPLES=3",
      "--gin.BATCH_SIZE=2"])
  assert path == str(output)
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["index"] for r in records] == [0, 1, 2]
  assert all(isinstance(r["prediction"], str) and r["target"] for r in records)


def test_packing_values_choose_the_packer():
  from elm_jax.data import feature_converters  # pylint: disable=g-import-not-at-top
  from elm_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top
  assert input_pipeline.packer_name(True) == "first_fit"
  assert input_pipeline.packer_name(False) == "none"
  assert isinstance(input_pipeline.make_feature_converter("first_fit", 0),
                    feature_converters.FirstFitEncDecFeatureConverter)
  seqio_packer = input_pipeline.make_feature_converter("seqio", 0)
  assert type(seqio_packer) is seqio.EncDecFeatureConverter
  assert seqio_packer.pack
  with pytest.raises(ValueError, match="packing='dense'"):
    input_pipeline.packer_name("dense")

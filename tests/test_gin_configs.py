"""Every shipped run and experiment gin file parses and builds; misspellings get hints."""


import gin
import pytest

from elm_jax import gin_utils
from elm_jax import train as train_script
from elm_jax.training import inference  # pylint: disable=unused-import
from elm_jax.training import trainer
from tests import train_fixtures

GIN_DIR = train_fixtures.REPO / "gin"

# The training files and the bindings of their required macros (beyond the model).
TRAIN_FILES = {
    "runs/finetune.gin": ["TRAIN_STEPS=3"],
    "runs/pretrain.gin": ["TRAIN_STEPS=3"],
    "experiments/prompt_expert.gin": ["TRAIN_STEPS=3", "trainer.train.epochs=None",
                                      "ADAPTER_REDUCTION_FACTOR=4"],
    "experiments/dataset_expert.gin": ["TRAIN_STEPS=3"],
    "experiments/mt_baseline.gin": ["TRAIN_STEPS=3"],
}


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def model_gin(tmp_path_factory):
  return train_fixtures.write_tiny_model_gin(tmp_path_factory.mktemp("gin"))


@pytest.mark.parametrize("gin_file", sorted(TRAIN_FILES) + ["runs/infer.gin"])
def test_run_file_names_required_macros(gin_file):
  header = (GIN_DIR / gin_file).read_text().split("from __gin__")[0]
  assert "%gin.REQUIRED" in header or "Required" in header


@pytest.mark.parametrize("gin_file", sorted(TRAIN_FILES))
def test_train_file_builds(gin_file, model_gin, tmp_path):
  bindings = [
      f"MIXTURE_OR_TASK_NAME='{train_fixtures.TASK}'", f"MODEL_DIR='{tmp_path}'",
      "INITIAL_CHECKPOINT_PATH=None", f"TASK_FEATURE_LENGTHS={train_fixtures.LENGTHS}",
      "BATCH_SIZE=4", *TRAIN_FILES[gin_file]]
  gin_utils.parse_gin([str(model_gin), gin_file], bindings)
  train_fn = gin_utils.configured(trainer.train)
  assert train_fn(dry_run=True) is None
  run_function = gin.query_parameter("train_script.run.function")
  assert run_function.selector == "trainer.train"


def test_pretrain_file_builds_span_corruption(model_gin, tmp_path):
  gin_utils.parse_gin([str(model_gin), "runs/pretrain.gin"],
                      [f"MODEL_DIR='{tmp_path}'", "INITIAL_CHECKPOINT_PATH=None",
                       "TRAIN_STEPS=2", "BATCH_SIZE=2",
                       "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"])
  assert gin_utils.configured(trainer.train)(dry_run=True) is None


def test_infer_file_parses(tmp_path):
  gin_utils.parse_gin(["runs/infer.gin"], [
      f"MIXTURE_OR_TASK_NAME='{train_fixtures.TASK}'", f"CHECKPOINT_PATH='{tmp_path}'",
      f"INFER_OUTPUT_PATH='{tmp_path / 'out.jsonl'}'",
      f"TASK_FEATURE_LENGTHS={train_fixtures.LENGTHS}"])
  assert gin.query_parameter("train_script.run.function").selector == "inference.infer"


def test_required_macro_unset_names_flag(model_gin):
  with pytest.raises(gin_utils.GinConfigError, match="--gin.MODEL_DIR="):
    gin_utils.parse_gin([str(model_gin), "runs/finetune.gin"], [
        f"MIXTURE_OR_TASK_NAME='{train_fixtures.TASK}'", "TRAIN_STEPS=3",
        "INITIAL_CHECKPOINT_PATH=None", f"TASK_FEATURE_LENGTHS={train_fixtures.LENGTHS}"])


def test_misspelled_binding_suggests_name(model_gin, tmp_path, capsys):
  argv = train_fixtures.train_argv(model_gin, tmp_path, experiment="experiments/dataset_expert.gin",
                                   steps=3, extra=["--gin.trainer.train.batch_sise=3"])
  assert train_script.main(argv) == 2
  assert "batch_size" in capsys.readouterr().err


def test_unknown_task_lists_nearest(model_gin, tmp_path):
  gin_utils.parse_gin([str(model_gin), "experiments/dataset_expert.gin"], [
      "MIXTURE_OR_TASK_NAME='bigbench_emoji_movi'", f"MODEL_DIR='{tmp_path}'",
      "INITIAL_CHECKPOINT_PATH=None", f"TASK_FEATURE_LENGTHS={train_fixtures.LENGTHS}",
      "TRAIN_STEPS=3"])
  with pytest.raises(ValueError, match="bigbench_emoji_movie"):
    gin_utils.configured(trainer.train)(dry_run=True)


def test_task_modules_import_error_names_module():
  with pytest.raises(ImportError, match="no_such_task_module"):
    train_script.import_task_modules(["no_such_task_module"])


def test_shipped_model_with_prompt_expert(tmp_path):
  gin_utils.parse_gin(["models/t5_1_1/tiny.gin", "experiments/prompt_expert.gin"], [
      f"MIXTURE_OR_TASK_NAME='{train_fixtures.TASK}'", f"MODEL_DIR='{tmp_path}'",
      "INITIAL_CHECKPOINT_PATH=None", f"TASK_FEATURE_LENGTHS={train_fixtures.LENGTHS}",
      "ADAPTER_REDUCTION_FACTOR=8", "TRAIN_STEPS=2", "trainer.train.epochs=None"])
  config = gin.query_parameter("trainer.train.model_config")
  assert config is not None
  assert gin_utils.configured(trainer.train)(dry_run=True) is None

"""End-to-end tests of `elm-jax eval` on tiny checkpoints and a real BIG-bench Task."""

import csv
import dataclasses
import json

from flax import traverse_util
import flax.linen as nn
import gin
import jax
import numpy as np
from PIL import Image
import pytest

from elm_jax import evaluate
from elm_jax.checkpoints import experts
from elm_jax.checkpoints import hf
from elm_jax.data import vocab as vocab_lib
from elm_jax.evaluation import reports
from elm_jax.models import t5

TASK = "bigbench_winowhy_score_eval"
MAX_EXAMPLES = 6


def _config(vocabulary, **overrides):
  return t5.T5Config(vocab_size=vocab_lib.padded_vocab_size(vocabulary), d_model=24, d_kv=5,
                     d_ff=30, num_heads=3, num_encoder_layers=2, num_decoder_layers=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     dropout_rate=0.0, **overrides)


def _init(config, seed):
  tokens = np.ones((1, 4), np.int32)
  return nn.unbox(t5.T5(config).init(jax.random.PRNGKey(seed), tokens, tokens))["params"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, bigbench_dir):
  del bigbench_dir  # Fetched by the fixture; the Task reads it.
  vocabulary = vocab_lib.get_vocabulary()
  config = _config(vocabulary)
  path = tmp_path_factory.mktemp("models") / "hf_base"
  hf.save_hf(path, config, _init(config, 0))
  return path


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _run(*flags):
  return evaluate.main(["--gin_file=runs/eval.gin", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
                        "--gin.SPLIT='all'", f"--gin.MAX_EXAMPLES={MAX_EXAMPLES}",
                        "--gin.BATCH_SIZE=4", *flags])


def test_eval_base_model_writes_all_outputs(base_dir, tmp_path):
  out = tmp_path / "out"
  assert _run(f"--gin.CHECKPOINT_PATH='{base_dir}'", f"--gin.EVAL_OUTPUT_DIR='{out}'") == 0
  written = sorted(p.name for p in out.iterdir())
  assert written == sorted([*reports.OUTPUT_FILES, "per_dataset.png", "per_dataset.svg"])
  with Image.open(out / "per_dataset.png") as image:
    assert image.format == "PNG"

  predictions = [json.loads(line) for line in (out / reports.PREDICTIONS).read_text().splitlines()]
  assert len(predictions) == MAX_EXAMPLES
  assert {p["task"] for p in predictions} == {TASK}
  assert all(len(p["scores"]) == 2 for p in predictions)  # winowhy is two-way.

  results = reports.read_results(out)
  prompt, = results["prompts"]
  hits = sum(p["is_correct"] for p in predictions)
  assert prompt["metrics"]["accuracy"] == pytest.approx(100 * hits / MAX_EXAMPLES)
  assert results["datasets"][0]["dataset"] == "winowhy"
  assert results["metadata"]["checkpoint_format"] == "hf"

  with open(out / reports.PER_PROMPT_CSV, newline="") as f:
    rows = list(csv.DictReader(f))
  assert rows[0]["task"] == TASK
  assert "## Per dataset" in (out / reports.RESULTS_MARKDOWN).read_text()


def test_eval_expert_applied_to_base(base_dir, tmp_path):
  vocabulary = vocab_lib.get_vocabulary()
  base_config, base_params = hf.load_hf(base_dir)
  config = dataclasses.replace(base_config, adapter=t5.AdapterConfig(reduction_factor=4))
  trained = traverse_util.flatten_dict(_init(config, 1), sep="/")
  adapter = {k: np.asarray(v) + 0.1 for k, v in trained.items()
             if experts.is_added_parameter(k)}
  metadata = experts.ExpertMetadata(
      id="winowhy_test_expert", kind="prompt", trainable="adapter", task=TASK,
      base_fingerprint=experts.fingerprint(base_params), model_config=config.to_dict(),
      adapter=dataclasses.asdict(config.adapter))
  expert_dir = tmp_path / "expert"
  experts.save_expert(expert_dir, params=traverse_util.unflatten_dict(adapter, sep="/"),
                      metadata=metadata)

  assert _run(f"--gin.CHECKPOINT_PATH='{base_dir}'", f"--gin.EXPERT_PATH='{expert_dir}'") == 0
  out = expert_dir / "eval" / TASK  # The default output folder.
  results = reports.read_results(out)
  assert results["metadata"]["expert_id"] == "winowhy_test_expert"

  base_out = tmp_path / "base"
  assert _run(f"--gin.CHECKPOINT_PATH='{base_dir}'", f"--gin.EVAL_OUTPUT_DIR='{base_out}'") == 0
  expert_scores = [json.loads(l)["scores"] for l in (out / reports.PREDICTIONS).open()]
  base_scores = [json.loads(l)["scores"] for l in (base_out / reports.PREDICTIONS).open()]
  # The adapters change the model, so the scores must differ from the base's.
  assert not np.allclose(expert_scores, base_scores)
  del vocabulary


def _save_adapter_expert(base_dir, expert_dir, *, seed, expert_id):
  base_config, base_params = hf.load_hf(base_dir)
  config = dataclasses.replace(base_config, adapter=t5.AdapterConfig(reduction_factor=4))
  trained = traverse_util.flatten_dict(_init(config, seed), sep="/")
  adapter = {k: np.asarray(v) + 0.1 * seed for k, v in trained.items()
             if experts.is_added_parameter(k)}
  metadata = experts.ExpertMetadata(
      id=expert_id, kind="prompt", trainable="adapter", task=TASK,
      base_fingerprint=experts.fingerprint(base_params), model_config=config.to_dict(),
      adapter=dataclasses.asdict(config.adapter))
  experts.save_expert(expert_dir, params=traverse_util.unflatten_dict(adapter, sep="/"),
                      metadata=metadata)


def test_eval_experts_root_writes_matrix(base_dir, tmp_path):
  root = tmp_path / "experts"
  for seed, name in ((1, "first"), (2, "second")):
    _save_adapter_expert(base_dir, root / name, seed=seed, expert_id=name)
  out = tmp_path / "matrix"
  assert _run(f"--gin.CHECKPOINT_PATH='{base_dir}'", f"--gin.EXPERTS_ROOT='{root}'",
              f"--gin.EVAL_OUTPUT_DIR='{out}'", "--gin.BASELINE_EXPERT='first'") == 0

  cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
  assert sorted(c["expert"] for c in cells) == ["first", "second"]
  assert all(c["num_examples"] == MAX_EXAMPLES for c in cells)
  for stem in ("expert_accuracy", "expert_task_heatmap"):
    with Image.open(out / f"{stem}.png") as image:
      assert image.format == "PNG"
    assert (out / f"{stem}.svg").is_file()

  # A rerun finds every cell done and appends nothing.
  before = (out / "cells.jsonl").read_bytes()
  assert _run(f"--gin.CHECKPOINT_PATH='{base_dir}'", f"--gin.EXPERTS_ROOT='{root}'",
              f"--gin.EVAL_OUTPUT_DIR='{out}'") == 0
  assert (out / "cells.jsonl").read_bytes() == before


def test_expert_on_wrong_base_is_rejected(base_dir, tmp_path):
  base_config, base_params = hf.load_hf(base_dir)
  metadata = experts.ExpertMetadata(
      id="wrong_base", kind="prompt", trainable="full", base_fingerprint="0" * 64,
      model_config=base_config.to_dict())
  expert_dir = tmp_path / "wrong"
  flat = traverse_util.flatten_dict(base_params, sep="/")
  experts.save_expert(expert_dir, metadata=metadata, params=traverse_util.unflatten_dict(
      {"decoder/decoder_norm/scale": flat["decoder/decoder_norm/scale"]}, sep="/"))
  with pytest.raises(experts.BaseMismatchError, match="wrong_base"):
    _run(f"--gin.CHECKPOINT_PATH='{base_dir}'", f"--gin.EXPERT_PATH='{expert_dir}'")


def test_missing_required_macro_returns_2(capsys):
  assert evaluate.main(["--gin_file=runs/eval.gin", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'"]) == 2
  assert "CHECKPOINT_PATH" in capsys.readouterr().err


def test_unknown_task_lists_near_names(base_dir, tmp_path):
  with pytest.raises(ValueError, match="bigbench_winowhy_score_eval"):
    evaluate.main(["--gin_file=runs/eval.gin", "--gin.MIXTURE_OR_TASK_NAME='bigbench_winowhyy'",
                   f"--gin.CHECKPOINT_PATH='{base_dir}'",
                   f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'"])

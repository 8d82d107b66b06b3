"""Tests of the resumable expert-by-task matrix."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax.evaluation import matrix
from elm_jax.evaluation import scorer as scorer_lib
from elm_jax.models import t5

from elm_jax.data import vocab as vocab_lib

VOCABULARY = vocab_lib.get_vocabulary()
CONFIG = t5.T5Config(vocab_size=vocab_lib.padded_vocab_size(VOCABULARY), d_model=16, d_kv=3,
                     d_ff=22, num_heads=3, num_encoder_layers=1, num_decoder_layers=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     dropout_rate=0.0)
EXPERTS = ["expert_a", "expert_b", "expert_c"]
TASKS = ["task_x_score_eval", "task_y_score_eval"]
SETTINGS = {"split": "validation", "max_examples": None}
WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no", "maybe", "river", "stone"]


@pytest.fixture(scope="module")
def providers():
  model = t5.T5(CONFIG)
  tokens = np.ones((1, 4), np.int32)
  params = {name: nn.unbox(model.init(jax.random.PRNGKey(i), tokens, tokens))["params"]
            for i, name in enumerate(EXPERTS)}
  rng = np.random.default_rng(0)
  batches = {}
  for task in TASKS:
    examples = []
    for idx in range(6):
      num_choices = int(rng.integers(2, 4))
      choices = [" ".join(rng.choice(WORDS, size=rng.integers(1, 4))) for _ in range(num_choices)]
      correct = np.zeros(num_choices, bool)
      correct[rng.integers(num_choices)] = True
      question = " ".join(rng.choice(WORDS, size=6))
      examples.append({"inputs": VOCABULARY.encode(question) + [1], "answer_choices": choices,
                       "is_correct": correct, "idx": idx})
    batches[task] = list(scorer_lib.make_batches(examples, vocabulary=VOCABULARY,
                                                 batch_size=4, task_name=task))
  return (lambda expert: (model, params[expert])), (lambda task: batches[task])


def _compute(tmp_path, providers, **kwargs):
  model_provider, batch_provider = providers
  return matrix.compute_matrix(experts=EXPERTS, tasks=TASKS, output_dir=tmp_path,
                               model_provider=model_provider, batch_provider=batch_provider,
                               settings=SETTINGS, **kwargs)


class _CrashAfter:
  """Wraps score_batches; raises on call number `crash_at` (1-based)."""

  def __init__(self, crash_at):
    self.crash_at = crash_at
    self.calls = 0
    self.original = scorer_lib.score_batches

  def __call__(self, *args, **kwargs):
    self.calls += 1
    if self.calls == self.crash_at:
      raise RuntimeError("injected crash")
    return self.original(*args, **kwargs)


def test_matrix_resumes_after_crash(tmp_path, providers, monkeypatch):
  crash = _CrashAfter(crash_at=4)
  monkeypatch.setattr(matrix.scorer_lib, "score_batches", crash)
  with pytest.raises(RuntimeError, match="injected crash"):
    _compute(tmp_path / "m", providers)
  assert len(matrix.read_cells(tmp_path / "m")) == 3

  counter = _CrashAfter(crash_at=0)
  monkeypatch.setattr(matrix.scorer_lib, "score_batches", counter)
  cells = _compute(tmp_path / "m", providers)
  assert counter.calls == len(EXPERTS) * len(TASKS) - 3
  assert len(cells) == len(EXPERTS) * len(TASKS)

  # The resumed matrix equals one computed in a single run.
  fresh = _compute(tmp_path / "fresh", providers)
  for key, cell in fresh.items():
    assert cells[key].accuracy == cell.accuracy
  # The file contains each cell once.
  lines = (tmp_path / "m" / matrix.CELLS_FILE).read_text().splitlines()
  assert len(lines) == len(EXPERTS) * len(TASKS)


def test_torn_last_line_is_recomputed(tmp_path, providers):
  _compute(tmp_path, providers)
  path = tmp_path / matrix.CELLS_FILE
  lines = path.read_text().splitlines(keepends=True)
  last = json.loads(lines[-1])
  path.write_text("".join(lines[:-1]) + lines[-1][:25])  # A crash mid-write.

  cells = matrix.read_cells(tmp_path)
  assert (last["expert"], last["task"]) not in cells
  assert path.read_text().endswith("\n")

  cells = _compute(tmp_path, providers)
  assert cells[(last["expert"], last["task"])].accuracy == last["accuracy"]
  assert len(path.read_text().splitlines()) == len(EXPERTS) * len(TASKS)


def test_corrupt_middle_line_is_an_error(tmp_path):
  path = tmp_path / matrix.CELLS_FILE
  path.write_text('{"not": "a cell"}\n')
  with pytest.raises(ValueError, match="line 1"):
    matrix.read_cells(tmp_path)


def test_other_settings_are_rejected(tmp_path, providers):
  _compute(tmp_path, providers)
  model_provider, batch_provider = providers
  with pytest.raises(ValueError, match="another output folder"):
    matrix.compute_matrix(experts=EXPERTS, tasks=TASKS, output_dir=tmp_path,
                          model_provider=model_provider, batch_provider=batch_provider,
                          settings={"split": "train", "max_examples": None})


def test_cell_accuracy_matches_direct_scoring(tmp_path, providers):
  model_provider, batch_provider = providers
  cells = _compute(tmp_path, providers, records_dir=tmp_path / "records")
  model, params = model_provider("expert_b")
  records = scorer_lib.score_batches(batch_provider("task_y_score_eval"),
                                     scorer=scorer_lib.ChoiceScorer(model), params=params)
  expected = 100 * np.mean([r["is_correct"] for r in records])
  assert cells[("expert_b", "task_y_score_eval")].accuracy == pytest.approx(expected)
  assert cells[("expert_b", "task_y_score_eval")].num_examples == 6
  written = (tmp_path / "records" / "expert_b" / "task_y_score_eval.jsonl").read_text()
  assert len(written.splitlines()) == 6


def test_oracle_and_array(tmp_path, providers):
  cells = _compute(tmp_path, providers)
  best = matrix.oracle(cells)
  for task in TASKS:
    top = max(cells[(e, task)].accuracy for e in EXPERTS)
    assert best[task][1] == top
  accuracy, experts, tasks = matrix.to_array(cells, tasks=TASKS)
  assert accuracy.shape == (3, 2)
  assert experts == EXPERTS
  assert accuracy[1, 0] == cells[("expert_b", TASKS[0])].accuracy


def test_path_like_names_are_rejected(tmp_path, providers):
  model_provider, batch_provider = providers
  with pytest.raises(ValueError, match="path separators"):
    matrix.compute_matrix(experts=["../evil"], tasks=TASKS, output_dir=tmp_path,
                          model_provider=model_provider, batch_provider=batch_provider,
                          settings=SETTINGS)


def test_run_matrix_on_expert_folders(tmp_path, bigbench_dir):
  """Expert folders applied onto an imported base, scored on a real BIG-bench Task."""
  del bigbench_dir  # Fetched by the fixture; the Task reads it.
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from elm_jax.checkpoints import experts  # pylint: disable=g-import-not-at-top
  from elm_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top

  tokens = np.ones((1, 4), np.int32)
  base_params = nn.unbox(t5.T5(CONFIG).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
  hf.save_hf(tmp_path / "base", CONFIG, base_params)
  _, base_params = hf.load_hf(tmp_path / "base")
  fingerprint = experts.fingerprint(base_params)
  flat = traverse_util.flatten_dict(base_params, sep="/")
  for i in range(2):
    # Full fine-tuning experts that only moved the final decoder norm.
    norm = {"decoder/decoder_norm/scale": np.asarray(flat["decoder/decoder_norm/scale"]) * (1 + i)}
    metadata = experts.ExpertMetadata(id=f"full_{i}", kind="dataset", trainable="full",
                                      base_fingerprint=fingerprint,
                                      model_config=CONFIG.to_dict())
    experts.save_expert(tmp_path / "experts" / f"full_{i}", metadata=metadata,
                        params=traverse_util.unflatten_dict(norm, sep="/"))

  cells = matrix.run_matrix(checkpoint_path=str(tmp_path / "base"),
                            experts_root=tmp_path / "experts",
                            mixture_or_task_name="bigbench_winowhy_score_eval",
                            output_dir=tmp_path / "matrix", split="all", batch_size=4,
                            max_examples=4)
  assert sorted(cells) == [("full_0", "bigbench_winowhy_score_eval"),
                           ("full_1", "bigbench_winowhy_score_eval")]
  assert all(cell.num_examples == 4 for cell in cells.values())

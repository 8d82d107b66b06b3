"""Runs examples/add_jsonl_task.py in a subprocess and checks what it prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import p3_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "add_jsonl_task.py"

# The first training example and its rendering by super_glue/rte "GPT-3 style":
# `{{premise}}\nQuestion: {{hypothesis}} True or False? ||| {{ answer_choices[label] }}`
# with answer choices `True ||| False`.
FIRST_PREMISE = "The cat sat on the warm windowsill all afternoon."
FIRST_HYPOTHESIS = "A cat was on the windowsill."
FIRST_INPUT = f"{FIRST_PREMISE}\nQuestion: {FIRST_HYPOTHESIS} True or False?"


@pytest.fixture(scope="module")
def run_example(tmp_path_factory, promptsource_dir):
  del promptsource_dir  # Fetched here so that the subprocess finds it in the cache.
  vocabulary = p3_fixtures.train_vocabulary(
      tmp_path_factory.mktemp("vocab"), p3_fixtures.all_fixture_text() + [FIRST_INPUT])
  output_dir = tmp_path_factory.mktemp("example")
  result = subprocess.run(
      [sys.executable, str(EXAMPLE), f"--vocab_path={vocabulary.sentencepiece_model_file}",
       f"--output_dir={output_dir}"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, check=False)
  return result, output_dir, vocabulary


def _line(stdout, prefix):
  lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
  assert lines, f"no line starts with {prefix!r} in:\n{stdout}"
  return lines[0][len(prefix):].strip()


def test_example_succeeds(run_example):
  result, _, _ = run_example
  assert result.returncode == 0, result.stderr[-3000:]


def test_example_registers_both_tasks(run_example):
  result, _, _ = run_example
  assert _line(result.stdout, "registered:") == "my_rte_gpt3, my_rte_gpt3_score_eval"


def test_example_renders_template(run_example):
  result, _, _ = run_example
  assert _line(result.stdout, "inputs_pretokenized:") == repr(FIRST_INPUT)
  targets = [line for line in result.stdout.splitlines()
             if line.startswith("targets_pretokenized:")]
  assert targets == [f"targets_pretokenized: {t!r}" for t in ("True", "False", "True")]


def test_example_prints_padded_batch(run_example):
  result, _, vocabulary = run_example
  assert _line(result.stdout, "batch['encoder_input_tokens']") == "shape=(3, 48) dtype=int32"
  assert _line(result.stdout, "batch['decoder_target_tokens']") == "shape=(3, 8) dtype=int32"
  tokens = json.loads(_line(result.stdout, "encoder_input_tokens[0]:"))
  expected = vocabulary.encode(FIRST_INPUT) + [vocabulary.eos_id]
  assert tokens == expected + [0] * (48 - len(expected))


def test_example_prints_scoring_example(run_example):
  result, _, _ = run_example
  assert _line(result.stdout, "answer_choices:") == "['True', 'False']"
  assert _line(result.stdout, "is_correct:") == "[True, False]"


def test_example_writes_jsonl(run_example):
  _, output_dir, _ = run_example
  lines = (output_dir / "rte_train.jsonl").read_text(encoding="utf-8").splitlines()
  assert json.loads(lines[0])["premise"] == FIRST_PREMISE
  assert len(lines) == 3

"""Tests of the report files and the figures."""

import csv
import json
from xml.etree import ElementTree

import numpy as np
from PIL import Image
import pytest

from elm_jax.evaluation import aggregation
from elm_jax.evaluation import matrix
from elm_jax.evaluation import plots
from elm_jax.evaluation import reports


def _summary():
  records = {
      "bigbench_winowhy_score_eval": [{"is_correct": i < 3} for i in range(4)],
      "super_glue_rte_GPT_3_style_score_eval": [{"is_correct": i < 1} for i in range(4)],
      "super_glue_rte_MNLI_crowdsource_score_eval": [{"is_correct": True}] * 2,
  }
  return aggregation.summarize_records(records), records


def test_write_report_files(tmp_path):
  summary, records = _summary()
  predictions = [r | {"task": t, "idx": i} for t, rs in records.items()
                 for i, r in enumerate(rs)]
  paths = reports.write_report(tmp_path, summary=summary, predictions=predictions,
                               metadata={"checkpoint": "/ckpt"})
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(reports.OUTPUT_FILES)

  lines = paths[reports.PREDICTIONS].read_text().splitlines()
  assert len(lines) == 10
  assert json.loads(lines[0])["task"] == "bigbench_winowhy_score_eval"

  with open(paths[reports.PER_DATASET_CSV], newline="") as f:
    rows = {r["dataset"]: r for r in csv.DictReader(f)}
  assert float(rows["rte"]["accuracy_mean"]) == pytest.approx(62.5)
  assert float(rows["rte"]["accuracy_median"]) == pytest.approx(62.5)
  assert rows["winowhy"]["num_prompts"] == "1"

  with open(paths[reports.PER_PROMPT_CSV], newline="") as f:
    prompt_rows = list(csv.DictReader(f))
  assert len(prompt_rows) == 3

  results = reports.read_results(tmp_path)
  assert results["metadata"] == {"checkpoint": "/ckpt"}
  assert results["overall"]["accuracy"]["mean_over_datasets"] == pytest.approx(68.75)

  markdown = paths[reports.RESULTS_MARKDOWN].read_text()
  assert "| rte | 2 | 62.50 | 62.50 |" in markdown
  assert "## Per prompt" in markdown


def _check_png_and_svg(paths):
  png, svg = paths
  assert png.suffix == ".png"
  with Image.open(png) as image:
    assert image.format == "PNG"
    width, height = image.size
  assert width > 200
  assert height > 150
  root = ElementTree.parse(svg).getroot()
  assert root.tag.endswith("svg")


@pytest.fixture
def matrix_file(tmp_path):
  """A cells.jsonl fixture: 4 experts x 3 prompts of 2 datasets."""
  rng = np.random.default_rng(0)
  store = matrix.CellStore(tmp_path / "m" / matrix.CELLS_FILE)
  tasks = ["super_glue_rte_a_score_eval", "super_glue_rte_b_score_eval",
           "bigbench_winowhy_score_eval"]
  for e in range(4):
    for task in tasks:
      store.append(matrix.Cell(expert=f"expert_{e}", task=task,
                               accuracy=float(rng.uniform(20, 80)), num_examples=10,
                               seconds=0.1, settings={"split": "validation"}))
  return tmp_path / "m"


def test_expert_accuracy_figure(matrix_file, tmp_path):
  means = matrix.expert_means(matrix.read_cells(matrix_file))
  paths = plots.expert_accuracy_figure(means, baseline=50.0,
                                       output_stem=tmp_path / "fig" / "experts")
  _check_png_and_svg(paths)


def test_task_comparison_figure(matrix_file, tmp_path):
  cells = matrix.read_cells(matrix_file)
  best = matrix.oracle(cells)
  per_task = {t: {"baseline": 40.0, "retrieved": cells[("expert_1", t)].accuracy,
                  "oracle": acc} for t, (_, acc) in best.items()}
  paths = plots.task_comparison_figure(per_task, output_stem=tmp_path / "tasks")
  _check_png_and_svg(paths)


def test_matrix_heatmap(matrix_file, tmp_path):
  accuracy, experts, tasks = matrix.to_array(matrix.read_cells(matrix_file))
  accuracy[0, 0] = np.nan  # A missing cell is drawn blank, not rejected.
  paths = plots.matrix_heatmap(accuracy, experts=experts, tasks=tasks,
                               output_stem=tmp_path / "heatmap")
  _check_png_and_svg(paths)


def test_heatmap_shape_mismatch_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="shape"):
    plots.matrix_heatmap(np.zeros((2, 3)), experts=["a"], tasks=["x", "y", "z"],
                         output_stem=tmp_path / "bad")


def test_empty_expert_figure_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="no values"):
    plots.expert_accuracy_figure({}, output_stem=tmp_path / "empty")


def test_matrix_figures_from_folder(matrix_file, tmp_path):
  paths = plots.matrix_figures(matrix_file, output_dir=tmp_path / "figures", baseline=45.0)
  assert [p.name for p in paths] == ["expert_accuracy.png", "expert_accuracy.svg",
                                     "expert_task_heatmap.png", "expert_task_heatmap.svg"]
  _check_png_and_svg(paths[:2])
  _check_png_and_svg(paths[2:])

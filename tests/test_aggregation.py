"""Tests of per-prompt, per-dataset and overall aggregation."""

import math

import pytest

from elm_jax.evaluation import aggregation


def _records(correct, total):
  return [{"is_correct": i < correct} for i in range(total)]


# Two datasets: "a" with prompts at 50, 80 and 20 percent; "b" with 10 and 40.
RECORDS = {
    "a_p1": _records(5, 10),
    "a_p2": _records(4, 5),
    "a_p3": _records(1, 5),
    "b_p1": _records(1, 10),
    "b_p2": _records(2, 5),
}


def _resolver(task):
  return task.split("_")[0]


def test_per_prompt_accuracy():
  summary = aggregation.summarize_records(RECORDS, dataset_resolver=_resolver)
  by_task = {p.task: p for p in summary.prompts}
  assert by_task["a_p2"].metrics["accuracy"] == pytest.approx(80.0)
  assert by_task["b_p1"].num_examples == 10


def test_per_dataset_mean_and_median():
  summary = aggregation.summarize_records(RECORDS, dataset_resolver=_resolver)
  by_dataset = {d.dataset: d for d in summary.datasets}
  assert by_dataset["a"].mean["accuracy"] == pytest.approx(50.0)
  assert by_dataset["a"].median["accuracy"] == pytest.approx(50.0)
  assert by_dataset["b"].mean["accuracy"] == pytest.approx(25.0)
  # An even number of prompts: the median is the mean of the middle two.
  assert by_dataset["b"].median["accuracy"] == pytest.approx(25.0)
  assert by_dataset["a"].prompts == ("a_p1", "a_p2", "a_p3")


def test_median_differs_from_mean():
  records = {"d_x": _records(9, 10), "d_y": _records(1, 10), "d_z": _records(2, 10)}
  summary = aggregation.summarize_records(records, dataset_resolver=_resolver)
  dataset, = summary.datasets
  assert dataset.mean["accuracy"] == pytest.approx(40.0)
  assert dataset.median["accuracy"] == pytest.approx(20.0)


def test_overall_means():
  summary = aggregation.summarize_records(RECORDS, dataset_resolver=_resolver)
  assert summary.overall["accuracy"]["mean_over_datasets"] == pytest.approx(37.5)
  assert summary.overall["accuracy"]["mean_over_prompts"] == pytest.approx(40.0)


def test_empty_prompt_has_zero_examples():
  value, count = aggregation.accuracy([])
  assert count == 0
  assert value == 0.0


def test_summarize_rejects_duplicates():
  result = aggregation.PromptResult("t", "d", 1, {"accuracy": 1.0})
  with pytest.raises(ValueError, match="more than once"):
    aggregation.summarize([result, result])


def test_summarize_rejects_nothing():
  with pytest.raises(ValueError, match="no prompt results"):
    aggregation.summarize([])


@pytest.mark.parametrize("task, dataset", [
    ("bigbench_strategyqa_score_eval", "strategyqa"),
    ("bigbench_code_line_description", "code_line_description"),
    ("bigbench_conceptual_combinations_invented_words_score_eval", "conceptual_combinations"),
    ("bigbench_logical_deduction_three_objects_score_eval", "logical_deduction"),
    ("super_glue_rte_GPT_3_style_score_eval", "rte"),
    ("anli_GPT_3_style_r2_score_eval", "anli_r2"),
    ("super_glue_wsc.fixed_GPT_3_Style_score_eval", "wsc"),
    ("winogrande_winogrande_xl_Replace_score_eval", "winogrande"),
    ("cos_e_v1.11_aligned_with_common_sense", "cos_e"),
    ("my_custom_task_score_eval", "my_custom_task"),
])
def test_dataset_of(task, dataset):
  assert aggregation.dataset_of(task) == dataset


def test_to_json_round_trips_numbers():
  summary = aggregation.summarize_records(RECORDS, dataset_resolver=_resolver)
  data = summary.to_json()
  assert [d["dataset"] for d in data["datasets"]] == ["a", "b"]
  assert math.isclose(data["overall"]["accuracy"]["mean_over_datasets"], 37.5)

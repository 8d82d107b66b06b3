"""Writes evaluation results as JSON lines, JSON, CSV and Markdown.

`write_report(output_dir, ...)` produces, all written atomically (a temporary
file in the same folder, then a rename):

| file | contents |
|---|---|
| `predictions.jsonl` | one JSON object per example: task, idx, scores, prediction, ... |
| `per_prompt.csv` | task, dataset, num_examples, one column per metric |
| `per_dataset.csv` | dataset, num_prompts, `<metric>_mean`, `<metric>_median` |
| `results.json` | the whole `Summary` plus run metadata |
| `results.md` | Markdown tables: overall, per dataset, per prompt |
"""

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from elm_jax import file_io
from elm_jax.evaluation import aggregation
from elm_jax.file_io import atomic_writer

PREDICTIONS = "predictions.jsonl"
PER_PROMPT_CSV = "per_prompt.csv"
PER_DATASET_CSV = "per_dataset.csv"
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
OUTPUT_FILES = (PREDICTIONS, PER_PROMPT_CSV, PER_DATASET_CSV, RESULTS_JSON,
                RESULTS_MARKDOWN)


def write_json(path: str | os.PathLike[str], value: Any) -> None:
  file_io.write_json_atomic(path, value)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping]) -> None:
  with atomic_writer(path) as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True))
      f.write("\n")


def _format(value: Any) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.2f}"
  return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """Renders a GitHub-flavoured Markdown table; floats get two decimals."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_format(v).replace("|", "\\|") for v in row) + " |")
  return "\n".join(lines)


def _metric_names(summary: aggregation.Summary) -> list[str]:
  return sorted({m for p in summary.prompts for m in p.metrics})


def _per_prompt_rows(summary, metrics):
  return [[p.task, p.dataset, p.num_examples] + [p.metrics.get(m, math.nan) for m in metrics]
          for p in summary.prompts]


def _per_dataset_rows(summary, metrics):
  rows = []
  for d in summary.datasets:
    row: list[Any] = [d.dataset, len(d.prompts)]
    for m in metrics:
      row += [d.mean.get(m, math.nan), d.median.get(m, math.nan)]
    rows.append(row)
  return rows


def render_markdown(summary: aggregation.Summary, *, title: str = "Evaluation results",
                    metadata: Mapping[str, Any] | None = None) -> str:
  """Returns the Markdown report: metadata, overall, per-dataset and per-prompt tables."""
  metrics = _metric_names(summary)
  parts = [f"# {title}", ""]
  for key, value in sorted((metadata or {}).items()):
    parts.append(f"- {key}: `{value}`")
  if metadata:
    parts.append("")

  parts += ["## Overall", ""]
  parts.append(markdown_table(
      ["metric", "mean over datasets", "mean over prompts"],
      [[m, summary.overall[m]["mean_over_datasets"], summary.overall[m]["mean_over_prompts"]]
       for m in metrics]))
  parts += ["", "## Per dataset (over prompts)", ""]
  header = ["dataset", "prompts"]
  for m in metrics:
    header += [f"{m} mean", f"{m} median"]
  parts.append(markdown_table(header, _per_dataset_rows(summary, metrics)))
  parts += ["", "## Per prompt", ""]
  parts.append(markdown_table(["task", "dataset", "examples"] + metrics,
                              _per_prompt_rows(summary, metrics)))
  parts.append("")
  return "\n".join(parts)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  with atomic_writer(path) as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def write_report(output_dir: str | os.PathLike[str], *, summary: aggregation.Summary,
                 predictions: Iterable[Mapping] = (),
                 metadata: Mapping[str, Any] | None = None) -> dict[str, Path]:
  """Writes every output file (see the module docstring); returns name -> path."""
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  metrics = _metric_names(summary)
  paths = {name: output_dir / name for name in OUTPUT_FILES}

  write_jsonl(paths[PREDICTIONS], predictions)
  _write_csv(paths[PER_PROMPT_CSV], ["task", "dataset", "num_examples"] + metrics,
             _per_prompt_rows(summary, metrics))
  dataset_header = ["dataset", "num_prompts"]
  for m in metrics:
    dataset_header += [f"{m}_mean", f"{m}_median"]
  _write_csv(paths[PER_DATASET_CSV], dataset_header, _per_dataset_rows(summary, metrics))
  write_json(paths[RESULTS_JSON], {"metadata": dict(metadata or {})} | summary.to_json())
  with atomic_writer(paths[RESULTS_MARKDOWN]) as f:
    f.write(render_markdown(summary, metadata=metadata))
  return paths


def read_results(path: str | os.PathLike[str]) -> dict:
  """Reads a `results.json` written by `write_report`."""
  path = Path(path)
  if path.is_dir():
    path = path / RESULTS_JSON
  with open(path, encoding="utf-8") as f:
    return json.load(f)

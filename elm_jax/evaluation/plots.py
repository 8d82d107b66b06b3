"""Figures of the evaluation, written as PNG and SVG with matplotlib's Agg backend.

- `expert_accuracy_figure`: mean accuracy of every expert on the unseen tasks,
  sorted, with the multitask baseline as a horizontal line (the main figure of
  the Expert Language Models paper).
- `task_comparison_figure`: per task, grouped bars for several systems, for
  example the multitask baseline, the retrieved expert and the oracle expert.
- `matrix_heatmap`: expert-by-task accuracy.

Every function takes `output_stem` (a path without suffix), writes
`<stem>.png` and `<stem>.svg` atomically, and returns both paths.
"""

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # Must precede pyplot: no display is needed or wanted.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from elm_jax import file_io  # pylint: disable=g-import-not-at-top

FORMATS = ("png", "svg")
_DPI = 120


def _save(figure, output_stem: str | os.PathLike[str]) -> tuple[Path, ...]:
  stem = Path(output_stem)
  paths = []
  for fmt in FORMATS:
    path = stem.with_name(f"{stem.name}.{fmt}")
    with file_io.atomic_writer(path, "wb") as f:
      figure.savefig(f, format=fmt, dpi=_DPI, bbox_inches="tight")
    paths.append(path)
  plt.close(figure)
  return tuple(paths)


def _check_nonempty(values: Mapping | Sequence, what: str) -> None:
  if len(values) == 0:
    raise ValueError(f"cannot plot {what}: no values were given.")


def expert_accuracy_figure(expert_means: Mapping[str, float], *,
                           output_stem: str | os.PathLike[str],
                           baseline: float | None = None,
                           baseline_label: str = "multitask baseline",
                           title: str = "Mean accuracy on unseen tasks",
                           max_labels: int = 60) -> tuple[Path, ...]:
  """Bars of per-expert mean accuracy (percent), best first, with a baseline line.

  Expert names label the x axis when there are at most `max_labels` experts;
  with more, the axis shows ranks only.
  """
  _check_nonempty(expert_means, "expert accuracies")
  names = sorted(expert_means, key=lambda n: (-expert_means[n], n))
  values = np.array([expert_means[n] for n in names])
  beats = values > baseline if baseline is not None else np.zeros(len(values), bool)

  width = min(max(6.0, 0.22 * len(names)), 40.0)
  figure, axes = plt.subplots(figsize=(width, 4.5))
  x = np.arange(len(names))
  axes.bar(x, values, color=np.where(beats, "tab:orange", "tab:blue"))
  if baseline is not None:
    axes.axhline(baseline, color="black", linestyle="--", linewidth=1.2,
                 label=f"{baseline_label} ({baseline:.2f})")
    axes.legend(loc="upper right")
  if len(names) <= max_labels:
    axes.set_xticks(x, names, rotation=90, fontsize=7)
  else:
    axes.set_xlabel("experts, sorted by mean accuracy")
  axes.set_ylabel("mean accuracy (%)")
  axes.set_title(title)
  axes.set_xlim(-0.6, len(names) - 0.4)
  return _save(figure, output_stem)


def task_comparison_figure(per_task: Mapping[str, Mapping[str, float]], *,
                           output_stem: str | os.PathLike[str],
                           systems: Sequence[str] = ("baseline", "retrieved", "oracle"),
                           title: str = "Accuracy per task") -> tuple[Path, ...]:
  """Grouped bars: one group per task, one bar per system (missing values skipped).

  `per_task` maps a task to {system: accuracy}. A "mean" group over the tasks
  that have every system is appended.
  """
  _check_nonempty(per_task, "per-task accuracies")
  tasks = list(per_task)
  complete = [t for t in tasks if all(s in per_task[t] for s in systems)]
  rows = {t: dict(per_task[t]) for t in tasks}
  if complete:
    rows["mean"] = {s: float(np.mean([per_task[t][s] for t in complete])) for s in systems}
  labels = list(rows)

  width = 0.8 / len(systems)
  figure, axes = plt.subplots(figsize=(min(max(6.0, 0.9 * len(labels)), 40.0), 4.5))
  x = np.arange(len(labels))
  for k, system in enumerate(systems):
    heights = np.array([rows[t].get(system, np.nan) for t in labels])
    axes.bar(x + (k - (len(systems) - 1) / 2) * width, np.nan_to_num(heights), width,
             label=system)
  axes.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
  axes.set_ylabel("accuracy (%)")
  axes.set_title(title)
  axes.legend()
  return _save(figure, output_stem)


def matrix_heatmap(accuracy: np.ndarray, *, experts: Sequence[str], tasks: Sequence[str],
                   output_stem: str | os.PathLike[str],
                   title: str = "Accuracy of each expert on each task",
                   max_labels: int = 80) -> tuple[Path, ...]:
  """Heatmap of `accuracy[expert, task]` (percent; NaN cells are left blank)."""
  accuracy = np.asarray(accuracy, float)
  if accuracy.shape != (len(experts), len(tasks)):
    raise ValueError(f"accuracy has shape {accuracy.shape} but there are {len(experts)} "
                     f"experts and {len(tasks)} tasks.")
  _check_nonempty(experts, "the expert-by-task matrix")

  height = min(max(3.0, 0.18 * len(experts)), 40.0)
  width = min(max(5.0, 0.25 * len(tasks) + 3), 40.0)
  figure, axes = plt.subplots(figsize=(width, height))
  image = axes.imshow(np.ma.masked_invalid(accuracy), aspect="auto", cmap="viridis",
                      interpolation="nearest")
  figure.colorbar(image, ax=axes, label="accuracy (%)")
  if len(tasks) <= max_labels:
    axes.set_xticks(np.arange(len(tasks)), tasks, rotation=90, fontsize=6)
  if len(experts) <= max_labels:
    axes.set_yticks(np.arange(len(experts)), experts, fontsize=6)
  axes.set_xlabel("evaluation task")
  axes.set_ylabel("expert")
  axes.set_title(title)
  return _save(figure, output_stem)


def matrix_figures(matrix_dir: str | os.PathLike[str], *, output_dir: str | os.PathLike[str],
                   baseline: float | None = None) -> tuple[Path, ...]:
  """Draws the per-expert figure and the heatmap of a matrix folder (`cells.jsonl`).

  Per-expert means are over datasets of the mean over their prompts; `baseline`
  is the multitask model's figure on the same tasks, drawn as a line.
  """
  from elm_jax.evaluation import matrix  # pylint: disable=g-import-not-at-top
  cells = matrix.read_cells(matrix_dir)
  output_dir = Path(output_dir)
  paths = expert_accuracy_figure(matrix.expert_means(cells), baseline=baseline,
                                 output_stem=output_dir / "expert_accuracy")
  accuracy, experts, tasks = matrix.to_array(cells)
  paths += matrix_heatmap(accuracy, experts=experts, tasks=tasks,
                          output_stem=output_dir / "expert_task_heatmap")
  return paths

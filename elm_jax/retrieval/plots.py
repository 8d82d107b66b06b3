"""Similarity heatmap of target tasks against the experts of a library."""

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from elm_jax import file_io

METRICS = ("vote_share", "mean_top1_similarity")


def plot_heatmap(values: np.ndarray, *, targets: Sequence[str], experts: Sequence[str],
                 output: str | os.PathLike[str], metric: str = "vote_share") -> Path:
  """Writes a [targets x experts] heatmap PNG; returns its path.

  The file is written under a temporary name and renamed, so a failed plot leaves no
  partial image.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  values = np.asarray(values, np.float32)
  if values.shape != (len(targets), len(experts)):
    raise ValueError(f"values has shape {values.shape}, expected "
                     f"({len(targets)} targets, {len(experts)} experts).")
  width = min(4 + 0.45 * len(experts), 40)
  height = min(2 + 0.4 * len(targets), 40)
  fig, ax = plt.subplots(figsize=(width, height))
  image = ax.imshow(values, aspect="auto", cmap="viridis")
  ax.set_xticks(range(len(experts)), labels=experts, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(range(len(targets)), labels=targets, fontsize=8)
  best = values.argmax(axis=1)
  for row, column in enumerate(best):
    ax.add_patch(plt.Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False,
                               edgecolor="red", linewidth=1.5))
  fig.colorbar(image, ax=ax, label=metric.replace("_", " "))
  ax.set_xlabel("expert")
  ax.set_ylabel("target")
  ax.set_title(f"{metric.replace('_', ' ')} (red: the most similar expert)")
  fig.tight_layout()
  output = Path(output)
  with file_io.atomic_writer(output, "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
  return output

"""A resumable sequence of stages with a record per finished stage.

Each stage returns a JSON-serializable summary. When a stage finishes, its summary
and wall time are written atomically to `<run_dir>/stages/<name>.json`; a rerun
finds that file and skips the stage, returning the stored summary. Stages that do
long work in parts (one expert after another) are themselves resumable, so a crash
inside a stage loses at most the part in progress.
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from absl import logging
import tqdm

from elm_jax import file_io

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of the run.

  Attributes:
    name: the record's file name under `stages/`; also printed.
    description: one line for logs and the report.
    run: called with the summaries of the earlier stages (by name); returns the
      stage's own summary.
  """
  name: str
  description: str
  run: Callable[[dict[str, Any]], dict[str, Any]]


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
  """Wraps `items` in a progress bar on interactive terminals, else logs every item."""
  if sys.stderr.isatty():
    yield from tqdm.tqdm(items, desc=desc, total=total, leave=False)
    return
  items = list(items) if total is None else items
  count = total if total is not None else len(items)  # type: ignore[arg-type]
  for index, item in enumerate(items, start=1):
    logging.info("%s: %d/%d", desc, index, count)
    yield item


def run_stages(run_dir: str | os.PathLike[str], stages: Sequence[Stage]) -> dict[str, Any]:
  """Runs the stages in order, skipping those with a record; returns all summaries."""
  records_dir = Path(run_dir) / "stages"
  summaries: dict[str, Any] = {}
  timings: dict[str, float] = {}
  for number, stage in enumerate(stages, start=1):
    record_path = records_dir / f"{stage.name}.json"
    if record_path.is_file():
      with open(record_path, encoding="utf-8") as f:
        record = json.load(f)
      summaries[stage.name] = record["summary"]
      timings[stage.name] = record["seconds"]
      logging.info("[%d/%d] %s: already done, skipped.", number, len(stages), stage.name)
      continue
    logging.info("[%d/%d] %s: %s", number, len(stages), stage.name, stage.description)
    start = time.perf_counter()
    summary = stage.run(summaries)
    seconds = time.perf_counter() - start
    file_io.write_json_atomic(record_path, {"summary": summary, "seconds": seconds},
                              indent=1)
    summaries[stage.name] = summary
    timings[stage.name] = seconds
    logging.info("[%d/%d] %s: done in %.1f s.", number, len(stages), stage.name, seconds)
  summaries["_timings"] = timings
  return summaries

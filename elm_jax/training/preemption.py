"""Stop training cleanly on SIGTERM (the preemption notice of most schedulers).

One process: a Python SIGTERM handler sets a flag, and the loop checks it after
every step, saves a checkpoint at that step and returns. Several processes: JAX's
preemption service (started by `jax.distributed.initialize`) owns SIGTERM and
agrees on a step that every process reaches, so that all of them save the same
step; `reached_preemption_sync_point` reports it.
"""

import signal
import threading
import types
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Reports whether training should save and stop after a step.

  Use as a context manager around the loop; the previous SIGTERM handler is
  restored on exit.
  """

  def __init__(self, *, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._flag = threading.Event()
    self._previous: dict[int, Any] = {}
    self._use_sync_point = jax.process_count() > 1
    self.received_signal: int | None = None

  def __enter__(self) -> "PreemptionWatcher":
    if self._use_sync_point:
      logging.info("Preemption: using JAX's preemption sync point across %d processes.",
                   jax.process_count())
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Preemption: not in the main thread, so no SIGTERM handler is "
                      "installed; a SIGTERM will end the process without a checkpoint.")
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: object) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    # Only set the flag: the loop saves at the next step boundary.
    self.received_signal = signum
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """Whether the loop should save at `step` (just completed) and return."""
    if self._use_sync_point:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # The preemption service is disabled.
        logging.log_first_n(logging.WARNING, "Preemption sync point unavailable: %s", 1, e)
        return False
    return self._flag.is_set()

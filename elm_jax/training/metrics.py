"""Training metrics: a rate-limited step log, TensorBoard scalars, a progress bar.

Scalar keys are namespaced: `train/...` (loss, accuracy, learning rate),
`eval/...` (validation), `timing/...` (steps/s, tokens/s, MFU, ETA).
"""

import dataclasses
import math
import sys
import time
from typing import Any, Mapping

from absl import logging
from clu import metric_writers
import jax


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf; the message names the step and checkpoint."""


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """How often and where training reports progress.

  Attributes:
    log_every_secs: minimum seconds between two step lines in the log.
    summary_every_steps: period of the TensorBoard `train/` and `timing/` scalars.
    peak_flops_per_sec: the accelerator's peak FLOP/s per device, for the MFU
      estimate; the default 1e11 is roughly one fp32 CPU core with AVX-512.
    progress_bar: show tqdm when stderr is a terminal.
  """
  log_every_secs: float = 10.0
  summary_every_steps: int = 10
  peak_flops_per_sec: float = 1e11
  progress_bar: bool = True


def mfu_estimate(*, num_params: int, tokens_per_sec: float, peak_flops_per_sec: float,
                 num_devices: int) -> float:
  """Model FLOP utilization: 6 * params * tokens/s over the mesh's peak FLOP/s.

  NOTE: an estimate. 6N FLOPs per token counts every parameter for every token,
  which overstates an encoder-decoder (encoder tokens skip the decoder) and
  ignores attention's quadratic term.
  """
  return 6.0 * num_params * tokens_per_sec / (peak_flops_per_sec * max(num_devices, 1))


class StepReporter:
  """Accumulates step metrics and writes them to the log, TensorBoard and tqdm."""

  def __init__(self, *, writer: metric_writers.MetricWriter, config: LoggingConfig,
               total_steps: int, start_step: int, tokens_per_step: int, num_params: int):
    self._writer = writer
    self._config = config
    self._total_steps = total_steps
    self._tokens_per_step = tokens_per_step
    self._num_params = num_params
    self._last_log_time = 0.0
    self._window_start_time = time.perf_counter()
    self._window_start_step = start_step
    self._sums: dict[str, float] = {}
    self._count = 0
    self._last_rates = {"steps_per_sec": 0.0, "tokens_per_sec": 0.0}
    self._timing_started = False
    self._bar = None
    if config.progress_bar and sys.stderr.isatty() and jax.process_index() == 0:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True)

  def record(self, step: int, metrics: Mapping[str, float]) -> None:
    """Add the host metrics of `step` (already checked to be finite)."""
    for key, value in metrics.items():
      self._sums[key] = self._sums.get(key, 0.0) + float(value)
    self._count += 1
    if self._bar is not None:
      self._bar.update(1)
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    now = time.perf_counter()
    if not self._timing_started:
      # The first step includes compilation: rates start after it.
      self._timing_started = True
      self._window_start_time = now
      self._window_start_step = step
      self._last_log_time = now
    window_steps = step - self._window_start_step
    is_summary_step = (step % self._config.summary_every_steps == 0 or
                       step == self._total_steps)
    is_log_step = now - self._last_log_time >= self._config.log_every_secs
    if not (is_summary_step or is_log_step) or window_steps <= 0:
      return

    elapsed = max(now - self._window_start_time, 1e-9)
    steps_per_sec = window_steps / elapsed
    tokens_per_sec = steps_per_sec * self._tokens_per_step
    means = {k: v / self._count for k, v in self._sums.items()}
    mfu = mfu_estimate(num_params=self._num_params, tokens_per_sec=tokens_per_sec,
                       peak_flops_per_sec=self._config.peak_flops_per_sec,
                       num_devices=jax.device_count())
    eta_secs = (self._total_steps - step) / steps_per_sec
    self._last_rates = {"steps_per_sec": steps_per_sec, "tokens_per_sec": tokens_per_sec}

    if is_summary_step:
      scalars = {f"train/{k}": v for k, v in means.items()}
      scalars.update({"timing/steps_per_sec": steps_per_sec,
                      "timing/tokens_per_sec": tokens_per_sec,
                      "timing/mfu": mfu, "timing/eta_secs": eta_secs})
      self._writer.write_scalars(step, scalars)
    if is_log_step:
      self._last_log_time = now
      logging.info(
          "step %d/%d: loss %.4f, accuracy %.4f, learning rate %.3g, %.2f steps/s, "
          "%.0f tokens/s, MFU %.2f%% (estimate), ETA %s",
          step, self._total_steps, means.get("loss", math.nan),
          means.get("accuracy", math.nan), means.get("learning_rate", math.nan),
          steps_per_sec, tokens_per_sec, 100 * mfu, format_seconds(eta_secs))
    self._sums.clear()
    self._count = 0
    self._window_start_time = now
    self._window_start_step = step

  def pause(self) -> None:
    """Exclude the time until the next `record` (evaluation, checkpoints) from rates."""
    self._paused_at = time.perf_counter()

  def resume(self) -> None:
    paused_at = getattr(self, "_paused_at", None)
    if paused_at is not None:
      self._window_start_time += time.perf_counter() - paused_at
      self._paused_at = None

  @property
  def last_rates(self) -> dict[str, float]:
    return dict(self._last_rates)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self._writer.flush()


def format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "unknown"
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def host_metrics(device_metrics: Mapping[str, Any]) -> dict[str, float]:
  """Fetch a step's metrics (replicated scalars) to the host as floats."""
  return {k: float(v) for k, v in jax.device_get(dict(device_metrics)).items()}


def check_finite(step: int, metrics: Mapping[str, float], *, last_checkpoint: int | None,
                 model_dir: str) -> None:
  """Raise NonFiniteLossError when the loss of `step` is NaN or Inf."""
  loss = metrics.get("loss", 0.0)
  if math.isfinite(loss):
    return
  checkpoint_note = (f"the last good checkpoint is step {last_checkpoint} in {model_dir}/checkpoints"
          if last_checkpoint is not None else "no checkpoint was saved before it")
  raise NonFiniteLossError(
      f"The training loss is {loss} at step {step}: training stopped and {checkpoint_note}. "
      f"Lower the learning rate, enable gradient clipping or check the batches of "
      f"this step (for example decoder_loss_weights).")

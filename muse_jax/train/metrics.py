"""Metric writers: TensorBoard event files without TensorFlow, and a console line.

The interface is clu's ``MetricWriter`` (write_scalars / write_images /
write_texts / flush / close). clu's own package imports TensorFlow on load, so
we implement that interface here on top of the ``tensorboard`` package's event
file writer; the files are read by TensorBoard and by
``tensorboard.backend.event_processing``.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Mapping

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """clu.metric_writers.MetricWriter, minus the TensorFlow import."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...
  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None: ...
  def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...

  def restart(self, step: int) -> None:
    """A resumed run logs ``step`` and later again: readers drop what was logged there before."""


class TensorBoardWriter(MetricWriter):

  def __init__(self, logdir: str):
    self._writer = EventFileWriter(logdir)

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def write_scalars(self, step, scalars):
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_images(self, step, images):
    """Images are uint8 [H, W, C] (C = 1, 3 or 4), written as PNG."""
    values = []
    for tag, img in images.items():
      img = np.asarray(img)
      buf = io.BytesIO()
      Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, format="PNG")
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=img.shape[0], width=img.shape[1], colorspace=img.shape[2],
          encoded_image_string=buf.getvalue())))
    self._add(step, values)

  def write_texts(self, step, texts):
    plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
    values = []
    for tag, text in texts.items():
      tensor = tensor_pb2.TensorProto(
          dtype=types_pb2.DT_STRING, string_val=[text.encode()],
          tensor_shape=tensor_shape_pb2.TensorShapeProto())
      values.append(summary_pb2.Summary.Value(
          tag=tag, tensor=tensor, metadata=summary_pb2.SummaryMetadata(plugin_data=plugin)))
    self._add(step, values)

  def restart(self, step):
    # TensorBoard purges the events at >= step it read before a SessionLog.START at step
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           session_log=event_pb2.SessionLog(
                                               status=event_pb2.SessionLog.START)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class ProgressLine:
  """One console line per report: step, rate, ETA and the headline metrics."""

  def __init__(self, total_steps: int, first_step: int):
    self.total_steps = total_steps
    self._t0, self._s0 = time.time(), first_step

  def report(self, step: int, scalars: Mapping[str, float], keys: tuple[str, ...]) -> float:
    elapsed = time.time() - self._t0
    rate = (step - self._s0) / elapsed if elapsed > 0 else 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    shown = " ".join(f"{k.split('/')[-1]}={scalars[k]:.4g}" for k in keys if k in scalars)
    logging.info("step %d/%d  %.2f steps/s  ETA %s  %s", step, self.total_steps, rate,
                 _hms(eta), shown)
    return rate


def _hms(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "--:--:--"
  s = int(seconds)
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
  """Rows of [N, H, W, 3] float images in [-1, 1] -> one uint8 [rows*H, N*W, 3] grid."""
  tiles = [np.concatenate(list(r), axis=1) for r in rows]
  grid = np.concatenate(tiles, axis=0)
  return np.round((np.clip(grid, -1, 1) + 1) * 127.5).astype(np.uint8)

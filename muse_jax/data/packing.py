"""Packing token sequences into fixed-length rows, as a Grain iterator stage.

Input: a stream of ``{"ids": int [L], "loss_mask": bool [L]}`` (what the formats
of ``muse_jax.data.sequences`` build) and skip markers ``{pipeline.SKIP_KEY:
reason}``. Output: rows of ``seq_len`` tokens::

  ids          int32  the sequences one after another, then ``pad_id``
  loss_mask    bool   the sequences' masks, False on padding
  segment_ids  int32  1, 2, ... per sequence in the row, 0 on padding
  positions    int32  0, 1, ... restarting at every sequence (what
                      ``qwen2.segment_positions`` derives from segment_ids)

``llm_trainer.next_token_targets`` turns a batch of rows into the train step's
batch; the decoder's mask (``attention.SelfMask``) keeps segments apart.

How: the stage reads ``buffer_size`` elements, places their sequences with
first-fit decreasing (longest first, each into the first row with room; within
a row, stream order), and emits those rows before reading the next buffer. A
sequence is never cut (an image is never split): one longer than ``seq_len``
is dropped and counted (``data/dropped_too_long``). The partly filled rows of
a buffer are emitted as they are, so a larger buffer pads less.

State (what Grain checkpoints): the parent's state before the current buffer,
the number of its rows already emitted, and the counters. Restoring re-reads
the buffer (the parent is deterministic), packs it again identically, and
continues at the same row: the state stays small (no tokens in it) and
JSON-serialisable, the scheme of ``pipeline.SkipAndBatchIterator``.

Counters (cumulative, part of the state): ``data/sequences`` packed,
``data/dropped_too_long``, ``data/skipped_<reason>`` per skip reason,
``data/rows`` and ``data/padding_tokens`` emitted; ``counters()`` adds
``data/padding_fraction`` = padding tokens / row tokens.
"""

from __future__ import annotations

import grain
import numpy as np

from muse_jax import config_lib
from muse_jax.data import pipeline


def first_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
  """Indices of the sequences in each row (all lengths <= seq_len), each row in index order.

  Longest first, each into the first row with room; ties keep index order, so the
  plan is a deterministic function of the lengths.
  """
  rows, room = [], []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    for r, free in enumerate(room):
      if lengths[i] <= free:
        rows[r].append(i)
        room[r] = free - lengths[i]
        break
    else:
      rows.append([i])
      room.append(seq_len - lengths[i])
  return [sorted(row) for row in rows]


def make_row(sequences: list[dict[str, np.ndarray]], seq_len: int,
             pad_id: int = 0) -> dict[str, np.ndarray]:
  """Sequences (total length <= seq_len) -> one padded row with segment ids and positions."""
  lengths = np.array([len(s["ids"]) for s in sequences])
  used = int(lengths.sum())
  ids = np.full(seq_len, pad_id, np.int32)
  ids[:used] = np.concatenate([s["ids"] for s in sequences])
  loss_mask = np.zeros(seq_len, bool)
  loss_mask[:used] = np.concatenate([s["loss_mask"] for s in sequences])
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[:used] = np.repeat(np.arange(1, len(sequences) + 1, dtype=np.int32), lengths)
  positions = np.zeros(seq_len, np.int32)
  starts = np.cumsum(lengths) - lengths
  positions[:used] = np.arange(used, dtype=np.int32) - np.repeat(starts, lengths)
  return {"ids": ids, "loss_mask": loss_mask, "segment_ids": segment_ids,
          "positions": positions}


class PackIterator(grain.DatasetIterator):
  """Rows of ``seq_len`` tokens from a stream of sequences (see the module docstring)."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, buffer_size: int,
               pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._buffer_size = buffer_size
    self._pad_id = pad_id
    self._counters = self._zero_counters()
    self._state_before_buffer = parent.get_state()
    self._sequences, self._rows, self._emitted = [], [], 0
    self._consecutive_unusable = 0

  @staticmethod
  def _zero_counters() -> dict[str, int]:
    return dict.fromkeys(("data/sequences", "data/dropped_too_long", "data/rows",
                          "data/padding_tokens"), 0)

  def _count(self, name: str) -> None:
    self._counters[name] = self._counters.get(name, 0) + 1

  def _unusable(self, name: str) -> None:
    self._count(name)
    self._consecutive_unusable += 1
    if self._consecutive_unusable >= pipeline.MAX_CONSECUTIVE_SKIPS:
      raise RuntimeError(
          f"{self._consecutive_unusable} examples in a row could not be packed "
          f"({self._counters}); the data source is broken or seq_len={self._seq_len} is too "
          "short for its examples")

  def _next_buffer(self) -> None:
    self._state_before_buffer = self._parent.get_state()
    sequences = []
    for _ in range(self._buffer_size):
      try:
        element = next(self._parent)
      except StopIteration:
        break
      if pipeline.SKIP_KEY in element:
        self._unusable(f"data/skipped_{element[pipeline.SKIP_KEY]}")
      elif len(element["ids"]) > self._seq_len:
        self._unusable("data/dropped_too_long")
      else:
        self._consecutive_unusable = 0
        sequences.append(element)
    self._sequences = sequences
    self._rows = first_fit_decreasing([len(s["ids"]) for s in sequences], self._seq_len)
    self._emitted = 0

  def __next__(self) -> dict[str, np.ndarray]:
    while self._emitted == len(self._rows):
      self._next_buffer()
      if not self._rows:
        raise StopIteration
    members = [self._sequences[i] for i in self._rows[self._emitted]]
    self._emitted += 1
    row = make_row(members, self._seq_len, self._pad_id)
    self._counters["data/sequences"] += len(members)
    self._counters["data/rows"] += 1
    self._counters["data/padding_tokens"] += int(np.sum(row["segment_ids"] == 0))
    return row

  def counters(self) -> dict[str, float]:
    """The cumulative counters and ``data/padding_fraction``."""
    fraction = self._counters["data/padding_tokens"] / max(
        self._counters["data/rows"] * self._seq_len, 1)
    return {**self._counters, "data/padding_fraction": fraction}

  def get_state(self) -> dict:
    return {"parent": self._state_before_buffer, "rows_emitted": self._emitted,
            "counters": dict(self._counters)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._state_before_buffer = state["parent"]
    self._sequences, self._rows, self._emitted = [], [], 0
    if state["rows_emitted"]:  # 0 only before the first buffer was read
      self._next_buffer()
      self._emitted = state["rows_emitted"]
    self._counters = {**self._zero_counters(), **state["counters"]}


class PackIterDataset(grain.IterDataset):
  """``parent`` (sequences and skip markers) packed into rows of ``seq_len`` tokens."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, *, buffer_size: int = 256,
               pad_id: int = 0):
    super().__init__(parent)
    config_lib.check(seq_len > 0, "seq_len", f"{seq_len} is not a positive length",
                     "set it to the decoder's training length, e.g. 4096")
    config_lib.check(buffer_size > 0, "sequences.pack_buffer", f"{buffer_size} is not positive",
                     "pack at least one example at a time (a few hundred pads little)")
    self._seq_len = seq_len
    self._buffer_size = buffer_size
    self._pad_id = pad_id

  def __iter__(self) -> PackIterator:
    return PackIterator(self._parent.__iter__(), self._seq_len, self._buffer_size,
                        self._pad_id)

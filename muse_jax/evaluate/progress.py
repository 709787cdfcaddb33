"""Progress bars with rate and ETA for long evaluations, on stderr (stdout keeps the JSON)."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None, desc: str, unit: str = "img",
             enabled: bool = True) -> Iterator[T]:
  """``items`` passed through, with a bar showing count, rate and time left."""
  return iter(tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr,
                   disable=not enabled, dynamic_ncols=True, mininterval=1.0))

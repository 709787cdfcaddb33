"""What every ``python -m muse_jax.*`` tool shares: user errors in one line.

A missing file, a bad flag value or weights of the wrong model are the user's to
fix, and a Python traceback only hides the message that says how. ``run`` prints
``<prog>: error: <message>`` on stderr and exits with status 1 for those; any
other exception is a bug and keeps its traceback. ``MUSE_JAX_TRACEBACK=1`` shows
the traceback of user errors too (for reporting a wrong message).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ValueError, KeyError)


def run(main: Callable[[Sequence[str]], Any], argv: Sequence[str], prog: str) -> Any:
  try:
    return main(argv)
  except USER_ERRORS as error:
    if os.environ.get("MUSE_JAX_TRACEBACK"):
      raise
    # KeyError's str() is the repr of its argument; the message reads better bare
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(1)

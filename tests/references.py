"""Independent numerical references (torch, transformers, ...) for the parity tests.

``require(name)`` imports a reference package for a test module. They are test
dependencies (``pip install -e ".[test]"`` installs them), so normally nothing
happens. When one is missing:

* with ``MUSE_JAX_REQUIRE_REFERENCES=1`` (``.ci/run`` sets it) the test fails with a
  message naming what to install: in CI a parity test never silently does not run;
* without the flag (a local checkout without the test extra) the test is skipped
  with the same message, shown by ``pytest -rs``, so the rest of the suite still runs.
"""

from __future__ import annotations

import importlib
import os

import pytest

FLAG = "MUSE_JAX_REQUIRE_REFERENCES"
_TEST_EXTRA = "pip install -e \".[test]\""
INSTALL = {
    "torch": f"torch==2.13.0, the CPU wheel ({_TEST_EXTRA} after installing torch, see .ci/run)",
    "transformers": f"transformers ({_TEST_EXTRA})",
    "tokenizers": f"tokenizers (installed with transformers: {_TEST_EXTRA})",
    "safetensors.torch": f"safetensors and torch ({_TEST_EXTRA})",
    "skimage.metrics": "scikit-image (pip install -e .)",
    "scipy.linalg": f"scipy ({_TEST_EXTRA})",
    "pytorch_fid.inception": f"pytorch-fid and torchvision ({_TEST_EXTRA})",
}


def require(name: str):
  """The imported module ``name``, or a failure (flag set) / skip naming what to install."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    what = INSTALL.get(name) or INSTALL.get(name.split(".")[0], name.split(".")[0])
    message = (f"reference package {name!r} is missing ({e}); install {what}. "
               f"{FLAG}=1 makes this a failure")
    if os.environ.get(FLAG, "") == "1":
      pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

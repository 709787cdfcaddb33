"""Abstract TPU devices for ahead-of-time compiles in tests (DESIGN.md section 6)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from muse_jax.parallel import sharding


def tpu_mesh(shape: tuple[int, int, int], topology_name: str = "v5e:2x2") -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh of abstract TPU devices; skips the test without libtpu."""
  # libtpu's lockfile guards real chips; compiling for a topology drives none, and other
  # processes (other test runs, compile.py) may hold it
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
  except Exception as error:  # no libtpu
    pytest.skip(f"no TPU topology to compile for: {error}")
  return jax.sharding.Mesh(np.asarray(topology.devices).reshape(shape), sharding.MESH_AXES)

"""Meshes, logical-axis rules, and the SDE step sharded over 8 CPU devices."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from muse_jax.parallel import sharding

HERE = os.path.dirname(__file__)


class _FakeMesh:
  """Just the axis sizes, which is all ``logical_to_mesh`` reads."""

  def __init__(self, data, fsdp, tensor):
    self.shape = dict(data=data, fsdp=fsdp, tensor=tensor)


def test_logical_rules():
  mesh = _FakeMesh(2, 4, 2)
  assert sharding.logical_to_mesh(("embed", "mlp"), (1024, 4096), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_mesh(("heads", "embed"), (64, 64), mesh) == P("tensor", "fsdp")
  # a dimension the axis does not divide is replicated, never an error
  assert sharding.logical_to_mesh(("embed", "mlp"), (1150, 4096), mesh) == P(None, "tensor")
  # one mesh axis is used at most once per array
  assert sharding.logical_to_mesh(("embed", "conv_out"), (64, 64), mesh) == P("fsdp", None)
  assert sharding.logical_to_mesh(("norm",), (64,), mesh) == P(None)
  # axes of size 1 are left out
  assert sharding.logical_to_mesh(("embed", "mlp"), (64, 64), _FakeMesh(8, 1, 1)) == P(None, None)


def test_mesh_shapes_and_errors():
  devices = jax.devices() * 8          # the shape logic only counts devices
  c = sharding.mesh_config(data=-1, fsdp=2, tensor=2)
  assert sharding._fill([c.data, c.fsdp, c.tensor], len(devices), "device") == [2, 2, 2]
  with pytest.raises(sharding.MeshError, match=r"needs 12 devices but there are 8"):
    sharding._fill([3, 2, 2], 8, "device")
  with pytest.raises(sharding.MeshError, match="cannot fill 8 devices"):
    sharding._fill([-1, 3, 1], 8, "device")
  with pytest.raises(sharding.MeshError, match="at most one -1"):
    sharding._fill([-1, -1, 1], 8, "device")
  mesh = sharding.make_mesh(sharding.mesh_config())
  assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == jax.device_count()


def _run(tmp_path, mesh, devices):
  out = tmp_path / f"mesh_{mesh.replace(',', '_')}.npz"
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, os.path.join(HERE, "multidevice", "sde_steps.py"),
                  f"--mesh={mesh}", f"--workdir={tmp_path / mesh}", f"--out={out}"],
                 check=True, env=env, timeout=1500, capture_output=True)
  return np.load(out)


def test_sde_step_on_2x2x2_mesh_matches_single_device(tmp_path):
  """3 steps (the discriminator joins at step 3) with data, fsdp and tensor axes all 2."""
  single = _run(tmp_path, "1,1,1", 1)
  sharded = _run(tmp_path, "2,2,2", 8)
  assert int(single["devices"]) == 1 and int(sharded["devices"]) == 8
  np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5)
  # the MLP kernel [32, 64] is split over fsdp (embed) and tensor (mlp)
  assert tuple(single["fc1_shard_shape"]) == (32, 64)
  assert tuple(sharded["fc1_shard_shape"]) == (16, 32)
  for name in single.files:
    if not name.startswith("params"):
      continue
    # Absolute bound: attention key biases have zero gradient in exact arithmetic
    # (softmax ignores them) and Adam turns their rounding noise into small steps,
    # so their relative error is meaningless. Seen: at most 3e-6.
    np.testing.assert_allclose(sharded[name], single[name], atol=1e-4, err_msg=name)

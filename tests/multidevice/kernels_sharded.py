"""The kernels under shard_map on a 4-device CPU mesh agree with one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice/kernels_sharded.py

Prints one line per check and exits non-zero on a mismatch: nearest_code (Pallas in
interpret mode, and chunked) with its rows split over (data, fsdp), and splash
attention (interpret mode) split over batch and heads, forward and gradient.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from muse_jax.kernels import attention, vq  # noqa: E402
from muse_jax.parallel import sharding  # noqa: E402

P = jax.sharding.PartitionSpec


def main() -> None:
  assert jax.device_count() == 4, "run with --xla_force_host_platform_device_count=4"
  mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=1, tensor=2))
  rng = np.random.default_rng(0)

  f = jnp.asarray(rng.standard_normal((200, 8)), jnp.float32)
  book = jnp.asarray(rng.standard_normal((700, 8)), jnp.float32)
  rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None))
  want = np.asarray(vq.nearest_code(f, book, impl="naive"))
  for impl in ("pallas", "chunked"):
    search = jax.jit(lambda f, b: vq.nearest_code(f, b, impl=impl, sharding=rows,
                                                  block_n=64, block_k=256))
    got = np.asarray(search(jax.device_put(f, rows), book))
    np.testing.assert_array_equal(got, want)
    print(f"nearest_code {impl} sharded over {rows.spec}: ok", flush=True)

  q = jnp.asarray(rng.standard_normal((2, 130, 4, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 130, 2, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 130, 2, 16)), jnp.float32)
  segment_ids = jnp.asarray(np.repeat([[1] * 60 + [2] * 60 + [0] * 10], 2, 0), jnp.int32)
  heads = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  mask = attention.SelfMask(True, segment_ids)

  def loss(impl, placement):
    options = attention.Options(impl, 128, 128)
    return lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(
        q, k, v, mask=mask, options=options, sharding=placement)))

  want_loss, want_grads = jax.value_and_grad(loss("xla", None), (0, 1, 2))(q, k, v)
  placed = [jax.device_put(x, heads) for x in (q, k, v)]
  got_loss, got_grads = jax.jit(jax.value_and_grad(loss("splash", heads), (0, 1, 2)))(*placed)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)
  print(f"splash sharded over {heads.spec}: loss and gradients ok", flush=True)


if __name__ == "__main__":
  main()

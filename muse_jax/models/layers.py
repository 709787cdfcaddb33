"""Layers shared by every model family.

Each parameter carries *logical* axis names (``embed``, ``mlp``, ``heads``, ...)
in its ``out_sharding`` metadata. Models never name mesh axes: the rules table in
``muse_jax.parallel.sharding`` maps logical names to mesh axes when a trainer
places the state on a mesh. Eager sharding is off so that building a model needs
no mesh at all (CPU tests, ``jax.eval_shape``).

Logical names used across the code base:
  embed       model width of a transformer (residual stream)
  mlp         hidden width of a feed-forward block
  heads       query heads x head_dim (flattened)
  kv_heads    key/value heads x head_dim (flattened)
  vocab       rows of a token embedding / LM head
  positions   rows of a learned position table
  patch       flattened patch pixels of a ViT stem
  conv_h, conv_w  spatial taps of a conv kernel
  conv_in, conv_out  input / output channels of a conv kernel
  norm        scale / bias of a normalisation layer
  codebook    entries of a VQ codebook
  code_dim    width of a VQ code

Activations are pinned at block boundaries with ``constrain(x, *names)``, using
the logical names ``batch``, ``seq`` (tokens), ``act_embed`` (residual width)
and ``spatial`` / ``act_channels`` (conv feature maps). ``constrain`` is the
identity unless a trainer traces the model inside ``activation_sharding``: so
models still know nothing of meshes, and the rules table decides where the
activations live.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from muse_jax.kernels import cpu_matmul

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nnx.initializers.lecun_normal()


def logical(init: Initializer, *names: str | None) -> Initializer:
  """Wraps an initializer so the created parameter records logical axis names."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          names: Sequence[str | None], dtype: Dtype = jnp.float32) -> nnx.Param:
  """A free-standing parameter (position tables, codebooks) with logical axes."""
  if len(shape) != len(names):
    raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} axis names, got {names}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Linear):
  """nnx.Linear applied to the input flattened to [tokens, in], in either kernel layout.

  The kernel is [in, out] (``kernel_out_in`` False, the default) or [out, in]
  (True, after ``use_out_in_kernels``); both give the same result.

  The 2-D matmul matters for the backward pass: differentiating a
  [B, T, in] x [in, out] contraction gives the weight gradient in a layout that
  XLA:CPU materialises with a strided transpose, which made a Qwen2 MLP's
  forward + backward ~30% slower. It costs nothing on TPU: compiled for v5e, a
  [4, 2048, 3584] x [3584, 18944] bf16 forward + backward has the same
  temporaries (310 MB), FLOPs and bytes accessed either way. The [out, in] layout is for decoding a few
  rows at a time: on CPU, with ``matmul_impl`` set to ``cpu_matmul.IMPLEMENTATION``
  by ``use_out_in_kernels``, those matmuls run ``kernels.cpu_matmul`` (see
  ``matmul``), while training is faster with [in, out].
  """

  kernel_out_in: bool = False
  matmul_impl: str = "xla"

  def __call__(self, x: jax.Array) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1])
    bias = self.bias[...] if self.bias is not None else None
    rows, kernel, bias = self.promote_dtype((rows, self.kernel[...], bias), dtype=self.dtype)
    y = matmul(rows, kernel, kernel_out_in=self.kernel_out_in, precision=self.precision,
               preferred_element_type=self.preferred_element_type, dot_general=self.dot_general,
               impl=self.matmul_impl)
    if bias is not None:
      y += bias
    return y.reshape(*x.shape[:-1], y.shape[-1])

  def in_out_kernel(self) -> jax.Array:
    """The kernel as [in, out] whatever its stored layout."""
    return self.kernel[...].T if self.kernel_out_in else self.kernel[...]


MATMUL_IMPLEMENTATIONS = ("xla", cpu_matmul.IMPLEMENTATION)


def matmul(rows: jax.Array, kernel: jax.Array, *, kernel_out_in: bool, precision=None,
           preferred_element_type: Dtype | None = None,
           dot_general: Callable[..., jax.Array] = jax.lax.dot_general,
           impl: str = "xla") -> jax.Array:
  """Rows [M, in] times a kernel stored [in, out] or [out, in] -> [M, out].

  With ``impl=cpu_matmul.IMPLEMENTATION`` (opted into by ``use_out_in_kernels``), an
  [out, in] kernel times 2 to 8 float32 rows on the CPU backend (batched decoding;
  ``cpu_matmul.applies``) runs ``kernels.cpu_matmul``; mesh-sharded traces (inside
  ``activation_sharding``) and everything else use ``dot_general``.
  """
  if (impl == cpu_matmul.IMPLEMENTATION and kernel_out_in
      and dot_general is jax.lax.dot_general and precision is None
      and _ACTIVATION_RESOLVER.get() is None and cpu_matmul.applies(rows, kernel)):
    return cpu_matmul.matmul_out_in(rows, kernel)
  extra = {} if preferred_element_type is None else {
      "preferred_element_type": preferred_element_type}
  contract = 1 if kernel_out_in else 0
  return dot_general(rows, kernel, (((1,), (contract,)), ((), ())), precision=precision, **extra)


def use_out_in_kernels(model: nnx.Module, matmul_impl: str = "xla") -> None:
  """Stores every ``Linear`` kernel under ``model`` as [out, in], in place, and selects
  ``matmul_impl`` for every module with a ``matmul_impl`` attribute.

  For serving. With ``matmul_impl=cpu_matmul.IMPLEMENTATION`` the kernel is built and
  registered here (``cpu_matmul.load``, not while tracing), and decode steps of 2 to 8
  rows run it (``matmul``); batch-8 greedy decoding of the 31M benchmark Qwen2 is
  ~1.5x faster on CPU. One kernel is transposed at a time, so memory
  grows by at most one kernel. The logical axis names are swapped with the
  axes. Checkpoints and Hugging Face export expect [in, out]: convert and save
  the model before calling this, not after.
  """
  if matmul_impl not in MATMUL_IMPLEMENTATIONS:
    raise ValueError(f"matmul_impl {matmul_impl!r} is unknown; choose one of "
                     f"{MATMUL_IMPLEMENTATIONS}")
  if matmul_impl == cpu_matmul.IMPLEMENTATION:
    cpu_matmul.load()   # on failure: one warning, and XLA's dot in every call
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "matmul_impl"):
      module.matmul_impl = matmul_impl
    if isinstance(module, Linear) and not module.kernel_out_in:
      # the last two axes: a scanned stack's kernels lead with their ``layers`` axis
      names = module.kernel.get_metadata().get("out_sharding")
      module.kernel = nnx.Param(jnp.swapaxes(module.kernel[...], -1, -2), eager_sharding=False,
                                out_sharding=(*names[:-2], names[-1], names[-2]) if names
                                else None)
      module.kernel_out_in = True


def linear(in_features: int, out_features: int, names: tuple[str | None, str | None], *,
           rngs: nnx.Rngs, use_bias: bool = True, dtype: Dtype = None,
           param_dtype: Dtype = jnp.float32,
           kernel_init: Initializer = default_kernel_init) -> Linear:
  """A ``Linear`` whose kernel is [in, out] with logical names ``names``.

  The layout is the transpose of ``torch.nn.Linear.weight``; conversion from
  Hugging Face checkpoints is a plain transpose.
  """
  return Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=logical(kernel_init, *names),
      bias_init=logical(nnx.initializers.zeros_init(), names[1]),
      rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs,
         strides: int = 1, padding: str | int | Sequence[tuple[int, int]] = "SAME",
         use_bias: bool = True, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
         kernel_init: Initializer = default_kernel_init) -> nnx.Conv:
  """2-D NHWC convolution; kernel is [kh, kw, in, out] (HWIO)."""
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=strides,
      padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=logical(kernel_init, "conv_h", "conv_w", "conv_in", "conv_out"),
      bias_init=logical(nnx.initializers.zeros_init(), "conv_out"),
      rngs=rngs)


def layer_norm(features: int, *, rngs: nnx.Rngs, eps: float = 1e-6, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, use_bias: bool = True) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features, epsilon=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      scale_init=logical(nnx.initializers.ones_init(), "norm"),
      bias_init=logical(nnx.initializers.zeros_init(), "norm"),
      rngs=rngs)


def group_norm(features: int, *, rngs: nnx.Rngs, num_groups: int = 32, eps: float = 1e-6,
               dtype: Dtype = None, param_dtype: Dtype = jnp.float32) -> nnx.GroupNorm:
  if features % num_groups:
    raise ValueError(f"GroupNorm: {features} channels are not divisible into {num_groups} groups")
  return nnx.GroupNorm(
      features, num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      scale_init=logical(nnx.initializers.ones_init(), "norm"),
      bias_init=logical(nnx.initializers.zeros_init(), "norm"),
      rngs=rngs)


def embed(num_embeddings: int, features: int, names: tuple[str, str] = ("vocab", "embed"), *,
          rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
          init: Initializer = nnx.initializers.normal(0.02)) -> nnx.Embed:
  return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                   embedding_init=logical(init, *names), rngs=rngs)


# (names, shape) -> a jax.sharding.Sharding; set only while a trainer traces its step.
_ACTIVATION_RESOLVER: contextvars.ContextVar[Callable[..., Any] | None] = (
    contextvars.ContextVar("muse_jax_activation_resolver", default=None))


@contextlib.contextmanager
def activation_sharding(resolver: Callable[[Sequence[str | None], Sequence[int]], Any]
                        ) -> Iterator[None]:
  """Within this context ``constrain`` places activations with ``resolver``."""
  token = _ACTIVATION_RESOLVER.set(resolver)
  try:
    yield
  finally:
    _ACTIVATION_RESOLVER.reset(token)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Pins activation ``x`` (one logical name per dimension) to its place on the mesh.

  Without it, XLA's sharding propagation may carry a parameter's layout into the
  activations (e.g. FSDP's split of a conv's output channels onto the feature
  map) and then reshard, or fully rematerialise, inside the next block.
  """
  resolve = _ACTIVATION_RESOLVER.get()
  if resolve is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {x.ndim}-d activation {x.shape} got names {names}")
  return jax.lax.with_sharding_constraint(x, resolve(names, x.shape))


def placement(names: Sequence[str | None], shape: Sequence[int]
              ) -> jax.sharding.NamedSharding | None:
  """Where an activation with logical ``names`` lives on the mesh; None outside a trainer.

  For kernels that run per shard (``shard_map``): models pass this on without
  knowing the mesh, as with ``constrain``.
  """
  resolve = _ACTIVATION_RESOLVER.get()
  return None if resolve is None else resolve(names, shape)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), matching torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
  return (x / jnp.maximum(norm, eps).astype(x.dtype))

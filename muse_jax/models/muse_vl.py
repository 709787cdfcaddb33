"""MUSE-VL: the Qwen2 decoder reading and writing SDE visual tokens.

Vocabulary layout (DESIGN.md section 4): the base checkpoint's rows first (text
ids, including any padding rows the base table already has, so no existing id
moves), then ``num_visual`` visual ids (visual code ``c`` is token
``visual_start + c``), then ``<soi>`` and ``<eoi>``, then padding up to a
multiple of 128 so the vocab axis shards evenly.

New rows are drawn from a Gaussian with the mean and full covariance of the
existing rows (Hewitt 2021, "Initializing new word embeddings"; also what
``transformers`` does with ``mean_resizing``). New input embeddings then look
like typical token embeddings, and a new LM-head row scores a hidden state like
a typical token does, so the extended model starts close to the base model.
``scale`` shrinks the spread (0 gives every new row the mean row).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from muse_jax.models import qwen2

SOI_TOKEN = "<soi>"
EOI_TOKEN = "<eoi>"


def visual_token(code: int) -> str:
  """The tokenizer string of visual code ``code`` (added when exporting a tokenizer)."""
  return f"<|vis_{code}|>"


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  text_size: int                 # rows of the base checkpoint's embedding table
  num_visual: int = 32768        # SDE codebook size
  pad_multiple: int = 128

  @property
  def visual_start(self) -> int:
    return self.text_size

  @property
  def visual_end(self) -> int:
    return self.text_size + self.num_visual

  @property
  def soi_id(self) -> int:
    return self.visual_end

  @property
  def eoi_id(self) -> int:
    return self.visual_end + 1

  @property
  def vocab_size(self) -> int:
    used = self.eoi_id + 1
    return -(-used // self.pad_multiple) * self.pad_multiple

  def codes_to_ids(self, codes: jax.Array) -> jax.Array:
    """SDE codes in [0, num_visual) -> token ids."""
    return jnp.asarray(codes, jnp.int32) + self.visual_start

  def is_visual(self, ids: jax.Array) -> jax.Array:
    ids = jnp.asarray(ids)
    return (ids >= self.visual_start) & (ids < self.visual_end)

  def ids_to_codes(self, ids: jax.Array) -> jax.Array:
    """Token ids -> SDE codes; ids that are not visual map to -1."""
    ids = jnp.asarray(ids, jnp.int32)
    return jnp.where(self.is_visual(ids), ids - self.visual_start, -1)

  def image_tokens(self, codes: jax.Array) -> jax.Array:
    """Codes [..., N] -> ``<soi> visual ids <eoi>`` [..., N + 2]."""
    ids = self.codes_to_ids(codes)
    soi = jnp.full(ids.shape[:-1] + (1,), self.soi_id, jnp.int32)
    eoi = jnp.full(ids.shape[:-1] + (1,), self.eoi_id, jnp.int32)
    return jnp.concatenate([soi, ids, eoi], axis=-1)


def row_statistics(table: np.ndarray, axis: int = 0,
                   block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
  """Mean [E] and covariance [E, E] (float64) of the rows of ``table``.

  Rows are along ``axis`` (0 for an embedding [V, E], 1 for an LM-head kernel
  [E, V]); they are visited in blocks so no float64 copy of the table is made.
  """
  rows = table.shape[axis]
  take = lambda lo, hi: np.asarray(
      table[lo:hi] if axis == 0 else table[:, lo:hi].T, dtype=np.float64)
  mean = sum(take(lo, min(lo + block, rows)).sum(axis=0) for lo in range(0, rows, block)) / rows
  cov = np.zeros((mean.size, mean.size))
  for lo in range(0, rows, block):
    centered = take(lo, min(lo + block, rows)) - mean
    cov += centered.T @ centered
  return mean, cov / max(rows - 1, 1)


def extend_vocab(table: np.ndarray, new_size: int, rng: np.random.Generator, *,
                 axis: int = 0, scale: float = 1.0, block: int = 2048) -> np.ndarray:
  """Grows ``table`` to ``new_size`` rows along ``axis``; new rows ~ N(mean, scale^2 cov).

  Existing rows are copied unchanged. The covariance gets a small ridge so that a
  rank-deficient table (e.g. trailing all-zero padding rows) still factorises.
  New rows are drawn in blocks straight into the output, so the peak memory is
  the output table plus one block.
  """
  rows, width = table.shape[axis], table.shape[1 - axis]
  if new_size < rows:
    raise ValueError(f"cannot extend a table of {rows} rows to {new_size}")
  mean, cov = row_statistics(table, axis)
  ridge = 1e-6 * max(np.trace(cov) / width, np.finfo(np.float32).tiny)
  chol = np.linalg.cholesky(cov + ridge * np.eye(width))
  out = np.empty((new_size, width) if axis == 0 else (width, new_size), table.dtype)
  if axis == 0:
    out[:rows] = table
  else:
    out[:, :rows] = table
  for lo in range(rows, new_size, block):
    hi = min(lo + block, new_size)
    new_rows = (mean + scale * rng.standard_normal((hi - lo, width)) @ chol.T).astype(table.dtype)
    if axis == 0:
      out[lo:hi] = new_rows
    else:
      out[:, lo:hi] = new_rows.T
  return out


class MuseVL(nnx.Module):
  """The decoder over the extended vocabulary, with visual-id helpers."""

  def __init__(self, config: qwen2.Qwen2Config, layout: VocabLayout, *, rngs: nnx.Rngs):
    if config.vocab_size != layout.vocab_size:
      raise ValueError(f"decoder vocab_size {config.vocab_size} does not match the MUSE-VL "
                       f"layout ({layout.vocab_size} = {layout.text_size} text + "
                       f"{layout.num_visual} visual + <soi>, <eoi>, padded to "
                       f"{layout.pad_multiple})")
    self.layout = layout
    self.llm = qwen2.Qwen2ForCausalLM(config, rngs=rngs)

  @classmethod
  def from_llm(cls, llm: qwen2.Qwen2ForCausalLM, num_visual: int = 32768, *, seed: int = 0,
               scale: float = 1.0, pad_multiple: int = 128) -> "MuseVL":
    """Wraps a text decoder, extending its embedding and LM head for the visual ids."""
    layout = VocabLayout(llm.config.vocab_size, num_visual, pad_multiple)
    config = dataclasses.replace(llm.config, vocab_size=layout.vocab_size)
    model = nnx.eval_shape(lambda: cls(config, layout, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    old = nnx.to_pure_dict(nnx.state(llm, nnx.Param))
    old["model"]["embed_tokens"]["embedding"] = extend_vocab(
        np.asarray(old["model"]["embed_tokens"]["embedding"]), layout.vocab_size, rng,
        scale=scale)
    if llm.lm_head is not None:
      old["lm_head"]["kernel"] = extend_vocab(
          np.asarray(old["lm_head"]["kernel"]), layout.vocab_size, rng, axis=1, scale=scale)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, {"llm": jax.tree.map(jnp.asarray, old)})
    return nnx.merge(graphdef, state)

  def hidden_states(self, ids, positions=None, segment_ids=None) -> jax.Array:
    return self.llm.hidden_states(ids, positions, segment_ids)

  def __call__(self, ids, positions=None, segment_ids=None) -> jax.Array:
    return self.llm(ids, positions, segment_ids)

  def visual_logits(self, hidden: jax.Array) -> jax.Array:
    """Logits over the visual ids only [..., num_visual]; index = SDE code."""
    kernel = self.llm.lm_head_kernel()[:, self.layout.visual_start:self.layout.visual_end]
    dtype = self.llm.config.dtype
    return jnp.dot(hidden.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)

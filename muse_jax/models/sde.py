"""SDE (Semantic Discrete Encoding) tokenizer, MUSE-VL section 3.1.

  z   = ImageEncoder(x)            SigLIP-architecture ViT, trained
  T   = SemanticEncoder(x)         SigLIP ViT, frozen
  f   = l2norm(QuantProj(T + z))   C -> d (d = 8)
  z_q = Quantize(f)                L2-normalised codebook, straight-through
  x^  = PixelDecoder(PostQuant(z_q))   LlamaGen VQ-16 conv decoder
  z_s = SemanticDecoder(z_q)       shallow ViT, d -> C per token

``mode`` is the paper's Table 6 ablation: ``image`` (f from z only, no semantic
branch: a plain VQGAN-style tokenizer), ``semantic`` (f from T only, no pixel
decoder), ``both`` (SDE).

When the token grid differs from what the 16x decoder needs (27x27 for SigLIP
/14 at 384 px), the code vectors are resized bilinearly to the decoder grid
(24x24) before ``post_quant``; both maps are linear, so this equals resizing the
post-quant features, at a fraction of the cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from muse_jax.models import layers
from muse_jax.models import quantizer as quantizer_lib
from muse_jax.models import siglip
from muse_jax.models import vqgan

MODES = ("both", "image", "semantic")


@dataclasses.dataclass(frozen=True)
class SDEConfig:
  encoder: siglip.SiglipConfig
  decoder: vqgan.DecoderConfig
  mode: str = "both"
  codebook_size: int = 32768
  code_dim: int = 8
  semantic_decoder_depth: int = 3
  semantic_decoder_width: int = 1024
  semantic_decoder_heads: int = 16
  semantic_decoder_mlp_dim: int = 4096
  vq_impl: str = "auto"
  simvq: bool = False

  @property
  def grid(self) -> int:
    return self.encoder.grid

  @property
  def decoder_grid(self) -> int:
    return self.encoder.image_size // self.decoder.upsample_factor

  @property
  def has_image_branch(self) -> bool:
    return self.mode in ("both", "image")

  @property
  def has_semantic_branch(self) -> bool:
    return self.mode in ("both", "semantic")


class SemanticDecoder(nnx.Module):
  """BEiT-v2-style feature decoder: code vectors [B, N, d] -> features [B, N, C]."""

  def __init__(self, cfg: SDEConfig, *, rngs: nnx.Rngs):
    enc = cfg.encoder
    kw = dict(rngs=rngs, dtype=enc.dtype, param_dtype=enc.param_dtype)
    width = cfg.semantic_decoder_width
    self.dtype = enc.dtype
    self.in_proj = layers.linear(cfg.code_dim, width, ("code_dim", "embed"), **kw)
    self.position_embedding = layers.param(
        rngs, nnx.initializers.normal(0.02), (enc.num_patches, width), ("positions", "embed"),
        enc.param_dtype)
    self.encoder = siglip.Encoder(width, cfg.semantic_decoder_depth, cfg.semantic_decoder_heads,
                                  cfg.semantic_decoder_mlp_dim, enc.layer_norm_eps,
                                  attention=enc.attention, scan_layers=enc.scan_layers,
                                  remat_policy=enc.remat_policy, **kw)
    self.norm = layers.layer_norm(width, eps=enc.layer_norm_eps, **kw)
    self.out_proj = layers.linear(width, enc.width, ("embed", None), **kw)

  def __call__(self, codes: jax.Array) -> jax.Array:
    x = self.in_proj(codes.astype(self.dtype))
    x = x + self.position_embedding[...].astype(x.dtype)[None]
    return self.out_proj(self.norm(self.encoder(x)))


class SDETokenizer(nnx.Module):

  def __init__(self, cfg: SDEConfig, *, rngs: nnx.Rngs):
    if cfg.mode not in MODES:
      raise ValueError(f"SDE mode {cfg.mode!r} is not one of {MODES}")
    self.cfg = cfg
    enc = cfg.encoder
    kw = dict(rngs=rngs, dtype=enc.dtype, param_dtype=enc.param_dtype)
    self.image_encoder = siglip.SiglipVisionTower(enc, rngs=rngs) if cfg.has_image_branch else None
    self.semantic_encoder = (siglip.SiglipVisionTower(enc, rngs=rngs)
                             if cfg.has_semantic_branch else None)
    self.quant_proj = layers.linear(enc.width, cfg.code_dim, ("embed", "code_dim"), **kw)
    self.quantizer = quantizer_lib.VectorQuantizer(
        cfg.codebook_size, cfg.code_dim, rngs=rngs, impl=cfg.vq_impl, simvq=cfg.simvq,
        param_dtype=enc.param_dtype)
    if cfg.has_image_branch:
      self.post_quant = layers.linear(cfg.code_dim, cfg.decoder.z_channels,
                                      ("code_dim", "conv_in"), **kw)
      self.pixel_decoder = vqgan.PixelDecoder(cfg.decoder, rngs=rngs)
    else:
      self.post_quant = self.pixel_decoder = None
    self.semantic_decoder = SemanticDecoder(cfg, rngs=rngs) if cfg.has_semantic_branch else None

  # -- pieces ---------------------------------------------------------------

  def semantic_features(self, images: jax.Array) -> jax.Array:
    """T: frozen SigLIP features [B, N, C] (no gradient flows into the tower)."""
    return jax.lax.stop_gradient(self.semantic_encoder(images))

  def features(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(f, T): unit-norm pre-quantisation features [B, N, d] and the semantic target."""
    target = self.semantic_features(images) if self.cfg.has_semantic_branch else None
    if self.cfg.mode == "both":
      fused = target + self.image_encoder(images)
    elif self.cfg.mode == "image":
      fused = self.image_encoder(images)
    else:
      fused = target
    return layers.l2_normalize(self.quant_proj(fused).astype(jnp.float32)), target

  def decode_vectors(self, z_q: jax.Array) -> jax.Array:
    """Code vectors [B, N, d] -> images [B, H, W, 3] through the pixel decoder."""
    if self.pixel_decoder is None:
      raise ValueError("this tokenizer has mode='semantic' and no pixel decoder; "
                       "train with config.model.mode='both' or 'image' to decode images")
    b, n, d = z_q.shape
    g = self.cfg.grid
    grid = z_q.reshape(b, g, g, d)
    dg = self.cfg.decoder_grid
    if dg != g:
      grid = jax.image.resize(grid, (b, dg, dg, d), method="bilinear", antialias=False)
    return self.pixel_decoder(self.post_quant(grid)).astype(jnp.float32)

  # -- public API -------------------------------------------------------------

  def __call__(self, images: jax.Array, *, entropy_temperature: float | None = None
               ) -> dict[str, Any]:
    """Training forward pass: everything the losses need."""
    f, target = self.features(images)
    q = self.quantizer(f, entropy_temperature=entropy_temperature)
    out = {"quantized": q, "f": f}
    if self.cfg.has_image_branch:
      out["reconstruction"] = self.decode_vectors(q.quantized)
    if self.cfg.has_semantic_branch:
      out["semantic_prediction"] = self.semantic_decoder(q.quantized).astype(jnp.float32)
      out["semantic_target"] = target.astype(jnp.float32)
    return out

  def encode(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> int32 codes [B, h, w]."""
    f, _ = self.features(images)
    codes = self.quantizer(f).codes
    g = self.cfg.grid
    return codes.reshape(codes.shape[0], g, g)

  def decode(self, codes: jax.Array) -> jax.Array:
    """int32 codes [B, h, w] -> images [B, H, W, 3] (nominally in [-1, 1])."""
    b = codes.shape[0]
    return self.decode_vectors(self.quantizer.lookup(codes.reshape(b, -1)))


# Parameters the optimiser updates: all but the frozen semantic encoder.
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("semantic_encoder")))

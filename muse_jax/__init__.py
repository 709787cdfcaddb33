"""muse_jax: MUSE-VL (SDE tokenizer + unified decoder LLM) in JAX / Flax NNX."""

__version__ = "0.1.0"

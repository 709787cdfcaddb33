"""Checkpoint conversion, Hugging Face / PyTorch files <-> muse_jax.

Command line: ``python -m muse_jax.convert`` (docs/convert.md). Modules: ``hf``
(decoder LLMs both ways, plus the stable ``load_qwen2`` / ``load_siglip_vision``
entry points), ``siglip`` (vision towers), ``lpips`` (VGG16 + heads), all reading
through ``tensor_io`` and writing the one weights format (``muse_jax.weights``);
``checkpoint`` is our decoder's weights plus the metadata that rebuilds it.
"""

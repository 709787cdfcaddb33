"""A tiny experiment config for testing `python -m muse_jax.data` (holds no
tests). The optional argument points it at an image folder instead of the
bundled photos: --config=tests/test_data_cli_config.py:/path/to/images"""

import ml_collections

from muse_jax import data


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.batch_size = 4
  config.data = data.image_data_config(source='bundled', image_size=32)
  if arg:
    config.data = data.image_data_config(source='image_folder', path=arg,
                                         image_size=32, num_eval_images=0)
  return config

"""Input pipelines on Grain: the data config, training pipelines with
checkpointable state and skip counters, held-out eval images.

See docs/data.md for sources, formats, fields and the bad-data policy.
"""

from muse_jax.data.config import DataConfigError
from muse_jax.data.config import image_data_config
from muse_jax.data.config import validate_config
from muse_jax.data.pipeline import COUNTER_NAMES
from muse_jax.data.pipeline import DataPipeline
from muse_jax.data.pipeline import build_train_pipeline
from muse_jax.data.pipeline import iter_eval_batches
from muse_jax.data.pipeline import load_eval_images

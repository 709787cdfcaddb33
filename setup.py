"""muse_jax: MUSE-VL (SDE tokenizer + unified decoder LLM) in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Ranges are the versions this code is tested with (Python 3.11, CPU; see .ci/run).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorstore>=0.1.86,<0.2",      # pretrained weights (muse_jax.weights): zarr3, local or gs://
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "tensorflow-datasets>=4.9.10,<5",
    "ml-collections>=1.1,<2",
    "absl-py>=2.3,<3",
    "einops>=0.8,<0.9",
    "numpy>=2.0,<3",
    "pillow>=11,<14",
    "scikit-image>=0.26,<0.27",      # its bundled photographs are the demo data
    "tensorboard>=2.21,<3",          # event files are written with its writer, no TensorFlow
    "safetensors>=0.8,<0.9",
    "transformers>=5.23,<6",         # Hugging Face configs and tokenizers
    "pyarrow>=20",                   # recaption parquet files
    "etils[epath]>=1.15,<2",         # workdir I/O, local or gs://
    "gcsfs>=2026.10,<2027",          # gs:// for etils.epath (Orbax's arrays use tensorstore)
    "tqdm>=4.66,<5",                 # evaluation progress bars
]

EXTRAS = {
    "test": [
        "pytest>=9,<10",
        "pytest-xdist>=3.8,<4",      # the README's test command runs the files on 2 workers
        "torch==2.13.0",             # numerical reference only; CPU wheel
        "gcp-storage-emulator>=2026.7,<2027",   # local GCS for the gs:// workdir test
        "torchvision==0.28.0",       # pytorch-fid's model code (tests/conftest.py: CPU torch)
        "pytorch-fid>=0.3,<0.4",     # FID Inception parity reference
        "scipy>=1.11,<2",            # independent Frechet distance (scipy.linalg.sqrtm)
    ],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
}

setup(
    name="muse_jax",
    version="0.1.0",
    description="MUSE-VL: SDE tokenizer and unified vision-language model in JAX",
    packages=find_packages(include=["muse_jax", "muse_jax.*"]),
    package_data={"muse_jax.kernels": ["*.cc"],    # compiled on first use (kernels/cpu_matmul.py)
                  "muse_jax.data": ["*.json"]},    # the demo's captions and questions
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

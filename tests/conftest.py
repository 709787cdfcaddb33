"""Test-wide setup: CPU only, and config files importable by path."""

import argparse
import importlib.util
import os
import pathlib
import socket
import sys
import tempfile
from http import HTTPStatus

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Trainer tests build the same step functions several times (straight run, killed
# run, resumed run), many of them in subprocesses of ``muse_jax.main``: one
# persistent compilation cache, set in the environment before JAX is imported, so
# that every subprocess reads and fills it too.
os.environ.setdefault("MUSE_JAX_TEST_CACHE", tempfile.mkdtemp(prefix="jax_cache_"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["MUSE_JAX_TEST_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def _declare_torchvision_ops():
  """Lets torchvision's Python code import next to the CPU torch wheel.

  PyPI's torchvision wheel is linked against CUDA torch, so its C extension does
  not load here and ``torchvision::nms`` / ``qnms`` are never declared; its
  ``_meta_registrations`` then raise on import. transformers imports torchvision
  whenever it is installed (every ``Qwen2ForCausalLM`` reference test), and
  pytorch-fid's Inception is built on it. The tests use only its pure-Python model
  code, so declaring the two schemas (no kernels) is enough.
  """
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
    return
  try:
    importlib.import_module("torchvision")
  except RuntimeError as error:
    if "torchvision::nms" not in str(error):
      raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    import torch
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declare_torchvision_ops.library = library   # the declarations live as long as it does
    importlib.import_module("torchvision")


_declare_torchvision_ops()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# also when this file is imported after JAX (tests/tiny_run_config.py in muse_jax.main)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py:get_config(arg), as `--config=configs/<name>.py:arg` would load it."""
  spec = importlib.util.spec_from_file_location(f"configs.{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_sde_config(*, batch_size: int, total_steps: int, disc_start: int):
  """The sde_256 demo shrunk to 32 px and 1-layer towers: seconds per step on a CPU."""
  c = load_config("sde_256", "demo")
  c.model.encoder.update(image_size=32, patch_size=8, width=32, mlp_dim=64, depth=1)
  c.model.semantic_decoder.update(width=32, mlp_dim=64)
  c.model.decoder.update(ch=16, z_channels=16, ch_mult=(1, 1, 2, 2), norm_groups=8)
  c.model.codebook_size = 64
  c.discriminator.update(ndf=16, n_layers=2, norm_groups=8)
  c.lpips_width_divisor = 8
  c.data.update(image_size=32, num_eval_images=2)
  c.update(batch_size=batch_size, total_steps=total_steps, log_every=1, usage_window=4,
           num_grid_images=2)
  c.loss.disc_start = disc_start
  return c


def mesh_run_parser() -> argparse.ArgumentParser:
  """Flags shared by the tests/multidevice scripts (see their docstrings)."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--meshes", required=True, help="colon-separated data,fsdp,tensor")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--save_on", default="", help="mesh whose run writes a checkpoint")
  parser.add_argument("--restore_onto", default="", help="mesh that resumes that checkpoint")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  return parser


def assert_same_state(a, b):
  """Two train states (host trees) agree bit for bit, leaf by leaf."""
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(b))
  assert len(leaves_a) == len(leaves_b) > 50
  for path, x in leaves_a:
    np.testing.assert_array_equal(np.asarray(x), np.asarray(leaves_b[jax.tree_util.keystr(path)]),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def config_loader():
  return load_config


def _download_like_gcs(download):
  """gcp-storage-emulator's media download, plus two things GCS does that tensorstore's
  OCDBT (Orbax's array store) relies on: the ``x-goog-generation`` header, and 304
  Not Modified for ``ifGenerationNotMatch`` equal to the object's generation."""
  from gcp_storage_emulator.exceptions import NotFound

  def handler(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      return download(request, response, storage, *args, **kwargs)   # its 404
    if request.query.get("ifGenerationNotMatch", [None])[0] == obj["generation"]:
      response.status = HTTPStatus.NOT_MODIFIED
      return None
    response["x-goog-generation"] = obj["generation"]
    return download(request, response, storage, *args, **kwargs)
  return handler


@pytest.fixture
def gcs_emulator(monkeypatch):
  """A GCS emulator in this process (memory only) with bucket ``muse-test``; the
  env points gcsfs (etils.epath) and tensorstore (Orbax's arrays) at it."""
  from gcp_storage_emulator import server as server_lib
  from gcp_storage_emulator.handlers import objects
  original = objects.download
  patched = _download_like_gcs(original)
  monkeypatch.setattr(objects, "download", patched)     # objects.get calls it by name
  for _, methods in server_lib.HANDLERS:                # the routes hold it directly
    for method, handler in list(methods.items()):
      if handler is original:
        monkeypatch.setitem(methods, method, patched)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  server = server_lib.create_server("localhost", port, in_memory=True, default_bucket="muse-test")
  server.start()
  url = f"http://localhost:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  yield env
  server.stop()

"""FID Inception: our Flax network vs the ``pytorch-fid`` package's, same random weights,
converted from a file in the public ``pt_inception-2015-12-05`` layout."""

import jax
import numpy as np
import pytest
import references

from muse_jax import weights
from muse_jax.convert import __main__ as convert_cli
from muse_jax.convert import inception as inception_convert

torch = references.require("torch")


def _random_fid_state_dict(pytorch_fid_inception, seed=0):
  """Random weights (BN statistics included) in the exact key layout of the public file."""
  torch.manual_seed(seed)
  model = pytorch_fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  state = {}
  for name, value in model.state_dict().items():
    if name.endswith("conv.weight"):
      fan_in = value[0].numel()
      state[name] = torch.randn_like(value) * (2.0 / fan_in) ** 0.5
    elif name.endswith("bn.weight") or name.endswith("running_var"):
      state[name] = torch.rand_like(value) + 0.5
    elif name.endswith("bn.bias") or name.endswith("running_mean"):
      state[name] = 0.1 * torch.randn_like(value)
    else:
      state[name] = value   # fc.*, num_batches_tracked: present in the file, unused for FID
  return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(pytorch-fid's InceptionV3 with the random weights, our converted weights directory)."""
  pytorch_fid_inception = references.require("pytorch_fid.inception")  # conftest.py: torchvision
  state = _random_fid_state_dict(pytorch_fid_inception)
  root = tmp_path_factory.mktemp("inception")
  torch.save(state, root / "pt_inception-random.pth")
  convert_cli.main(["inception", "--pth", str(root / "pt_inception-random.pth"),
                    "--out", str(root / "ours")])
  original = pytorch_fid_inception.load_state_dict_from_url
  pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
  try:
    reference = pytorch_fid_inception.InceptionV3([3]).eval()
  finally:
    pytorch_fid_inception.load_state_dict_from_url = original
  return reference, root / "ours"


def test_pool_features_match_pytorch_fid(converted):
  reference, ours_dir = converted
  model = inception_convert.load(ours_dir)
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, size=(2, 3, 64, 80)).astype(np.float32)   # resized to 299 by both
  with torch.no_grad():
    want = reference(torch.from_numpy(images))[0][:, :, 0, 0].numpy()
  got = np.asarray(jax.jit(lambda m, x: m(x))(model, images.transpose(0, 2, 3, 1) * 2 - 1))
  assert got.shape == want.shape == (2, 2048)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_converted_weights_layout(converted):
  _, ours_dir = converted
  index = weights.read_index(ours_dir)
  assert index.metadata["kind"] == inception_convert.KIND
  assert index.tensors["Mixed_7c/branch_pool/kernel"].shape == (1, 1, 2048, 192)
  assert not any(name.startswith("fc") for name in index.tensors)


def test_load_refuses_other_weights(tmp_path):
  weights.save(tmp_path / "other", {"w": np.zeros(3, np.float32)}, {"kind": "lpips_vgg16"})
  with pytest.raises(weights.WeightsMismatchError, match="not the FID Inception"):
    inception_convert.load(tmp_path / "other")

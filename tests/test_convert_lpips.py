"""Public-format LPIPS files (torchvision VGG16 + lpips heads) -> our LPIPS vs torch."""

import collections

import pytest
import references

torch = references.require("torch")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

from muse_jax import weights  # noqa: E402
from muse_jax.convert import __main__ as cli  # noqa: E402
from muse_jax.convert import lpips as lpips_convert  # noqa: E402
from muse_jax.convert import tensor_io  # noqa: E402
from muse_jax.models import lpips  # noqa: E402

_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_POOLS = (4, 9, 16, 23)       # torchvision vgg16.features max-pool indices
_TAPS = (3, 8, 15, 22, 29)    # relu1_2 ... relu5_3


def _random_state_dicts(seed=0):
  """Random weights in the exact key layouts of the public files."""
  torch.manual_seed(seed)
  vgg, in_ch = collections.OrderedDict(), 3
  for index, out_ch in zip(lpips.VGG16_CONV_INDICES, _CHANNELS):
    vgg[f"features.{index}.weight"] = torch.randn(out_ch, in_ch, 3, 3) * (2 / (9 * in_ch)) ** 0.5
    vgg[f"features.{index}.bias"] = 0.1 * torch.randn(out_ch)
    in_ch = out_ch
  vgg["classifier.6.bias"] = torch.zeros(10)      # present in torchvision's file; ignored
  heads = collections.OrderedDict(
      (f"lin{k}.model.1.weight", torch.rand(1, ch, 1, 1) / ch)
      for k, ch in enumerate(lpips.TAP_CHANNELS))
  return vgg, heads


def _torch_lpips(vgg, heads, x, y):
  """LPIPS (Zhang et al. 2018, v0.1 vgg) written out in torch from the two state dicts."""
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

  def taps(h):
    h, out = (h - shift) / scale, []
    for i in range(30):
      if f"features.{i}.weight" in vgg:
        h = F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)
      elif i in _POOLS:
        h = F.max_pool2d(h, 2, 2)
      else:
        h = F.relu(h)
      if i in _TAPS:
        out.append(h / (torch.sqrt(torch.sum(h ** 2, dim=1, keepdim=True)) + 1e-10))
    return out

  total = 0
  for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
    total = total + F.conv2d((fx - fy) ** 2, heads[f"lin{k}.model.1.weight"]).mean(dim=(2, 3))
  return total[:, 0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("lpips")
  vgg, heads = _random_state_dicts()
  torch.save(vgg, root / "vgg16.pth")
  torch.save(heads, root / "vgg_heads.pth", _use_new_zipfile_serialization=False)  # legacy format
  return vgg, heads, str(root / "vgg16.pth"), str(root / "vgg_heads.pth")


def _images(seed):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def test_lpips_on_converted_weights_matches_torch_reference(files, tmp_path):
  vgg, heads, vgg_path, heads_path = files
  x, y = _images(0), _images(1)
  y[1] = x[1] + 0.05 * y[1]                    # one near pair, one far pair
  with torch.no_grad():
    ref = _torch_lpips(vgg, heads, torch.tensor(x).permute(0, 3, 1, 2),
                       torch.tensor(y).permute(0, 3, 1, 2)).numpy()
  assert ref[1] < ref[0]
  model = lpips_convert.load_lpips(vgg_path, heads_path)
  out = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(x), jnp.asarray(y)))
  np.testing.assert_allclose(out, ref, rtol=1e-4)

  # through the CLI into what the SDE trainer loads as config.lpips_checkpoint
  cli.main(["lpips", "--vgg", vgg_path, "--heads", heads_path, "--out", str(tmp_path / "ckpt")])
  fresh = nnx.eval_shape(lambda: lpips.LPIPS(rngs=nnx.Rngs(0)))
  nnx.update(fresh, weights.load_pretrained(str(tmp_path / "ckpt"), nnx.state(fresh, nnx.Param)))
  np.testing.assert_array_equal(fresh.lin3.kernel[...], model.lin3.kernel[...])
  np.testing.assert_array_equal(fresh.features[7].kernel[...], model.features[7].kernel[...])


def test_backbone_from_safetensors_and_missing_heads_error(files, tmp_path):
  vgg, heads, _, heads_path = files
  safetensors_torch = references.require("safetensors.torch")
  safetensors_torch.save_file(dict(vgg), str(tmp_path / "vgg16.safetensors"))
  params = dict(lpips_convert.read_lpips(str(tmp_path / "vgg16.safetensors"), heads_path))
  np.testing.assert_array_equal(params[("features", 12, "kernel")],
                                vgg["features.28.weight"].numpy().transpose(2, 3, 1, 0))
  torch.save({k: v for k, v in heads.items() if not k.startswith("lin4")}, tmp_path / "h.pth")
  with pytest.raises(KeyError, match=r"lin4\.model\.1\.weight"):
    lpips_convert.read_lpips(str(tmp_path / "vgg16.safetensors"), str(tmp_path / "h.pth"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_reader_handles_views_dtypes_and_both_file_formats(tmp_path, zip_format):
  torch.manual_seed(0)
  base = torch.randn(6, 5)
  state = {"plain": torch.randn(3, 4), "transposed": base.t(), "sliced": base[2:, 1:4],
           "bf16": torch.randn(7).to(torch.bfloat16), "ints": torch.arange(5),
           "param": torch.nn.Parameter(torch.randn(2, 2)),
           "nested": {"inner": torch.ones(2)}}
  path = tmp_path / "state.pth"
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  reader = tensor_io.open_tensors(str(path))
  assert sorted(reader.keys()) == sorted(
      ["plain", "transposed", "sliced", "bf16", "ints", "param", "nested.inner"])
  for name, tensor in [("plain", state["plain"]), ("transposed", base.t()),
                       ("sliced", base[2:, 1:4]), ("ints", state["ints"]),
                       ("param", state["param"].detach()), ("nested.inner", torch.ones(2))]:
    np.testing.assert_array_equal(reader.read(name), tensor.numpy())
  assert reader.dtype("bf16").name == "bfloat16"
  np.testing.assert_array_equal(reader.read("bf16").astype(np.float32),
                                state["bf16"].float().numpy())


def test_reader_refuses_arbitrary_pickled_objects(tmp_path):
  torch.save({"weight": torch.ones(2), "callback": collections.Counter("ab")}, tmp_path / "x.pth")
  with pytest.raises(Exception, match="refusing to unpickle collections.Counter"):
    tensor_io.open_tensors(str(tmp_path / "x.pth"))

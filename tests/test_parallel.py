"""Meshes, logical-axis rules, and the SDE step sharded over 8 CPU devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from muse_jax.parallel import sharding

HERE = os.path.dirname(__file__)


class _FakeMesh:
  """Just the axis sizes, which is all ``logical_to_mesh`` reads."""

  def __init__(self, data, fsdp, tensor):
    self.shape = dict(data=data, fsdp=fsdp, tensor=tensor)


def test_logical_rules():
  mesh = _FakeMesh(2, 4, 2)
  assert sharding.logical_to_mesh(("embed", "mlp"), (1024, 4096), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_mesh(("heads", "embed"), (64, 64), mesh) == P("tensor", "fsdp")
  # a dimension the axis does not divide is replicated, never an error
  assert sharding.logical_to_mesh(("embed", "mlp"), (1150, 4096), mesh) == P(None, "tensor")
  # one mesh axis is used at most once per array
  assert sharding.logical_to_mesh(("embed", "conv_out"), (64, 64), mesh) == P("fsdp", None)
  assert sharding.logical_to_mesh(("norm",), (64,), mesh) == P(None)
  # axes of size 1 are left out
  assert sharding.logical_to_mesh(("embed", "mlp"), (64, 64), _FakeMesh(8, 1, 1)) == P(None, None)


# Every logical name and the mesh axes it must map to on a mesh where all axes are > 1,
# written out independently of sharding.DEFAULT_RULES.
EXPECTED_RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp", "conv_out": "fsdp",
    "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor", "vocab": "tensor",
    "conv_in": None, "conv_h": None, "conv_w": None, "positions": None, "norm": None,
    "codebook": None, "code_dim": None, "layers": None,
    "seq": None, "act_embed": None, "spatial": None, "act_channels": None,
}


def test_rules_table_has_each_name_once():
  names = [name for name, _ in sharding.DEFAULT_RULES]
  assert len(names) == len(set(names))
  assert set(names) == set(EXPECTED_RULES)


@pytest.mark.parametrize("name", sorted(EXPECTED_RULES))
def test_every_logical_rule(name):
  mesh = _FakeMesh(2, 4, 2)
  assert sharding.logical_to_mesh((name,), (16,), mesh) == P(EXPECTED_RULES[name])


def _param_specs(module_fn, mesh):
  """{param path: PartitionSpec} of every parameter of the module ``module_fn`` builds."""
  from flax import nnx
  state = nnx.state(nnx.eval_shape(module_fn), nnx.Param)
  specs = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = leaf.get_metadata().get("out_sharding")
    assert names and all(n is None or n in EXPECTED_RULES for n in names), (path, names)
    specs[".".join(str(getattr(k, "key", k)) for k in path)] = sharding.logical_to_mesh(
        names, leaf.shape, mesh)
  return specs


def test_model_parameters_follow_the_rules():
  """Every parameter of the decoder and the tokenizer carries known logical names, and the
  embedding, LM head, a KV projection, a conv kernel and the codebook land where they must."""
  from flax import nnx
  from conftest import tiny_sde_config
  from muse_jax import config_lib
  from muse_jax.models import qwen2, sde
  mesh = _FakeMesh(2, 2, 2)
  config = qwen2.Qwen2Config(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=2, mlp_dim=32, tie_word_embeddings=False)
  llm = _param_specs(lambda: qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
  assert llm["model.embed_tokens.embedding"] == P("tensor", "fsdp")      # [vocab, embed]
  assert llm["lm_head.kernel"] == P("fsdp", "tensor")                    # [embed, vocab]
  assert llm["model.layers.0.self_attn.k_proj.kernel"] == P("fsdp", "tensor")
  assert llm["model.layers.0.self_attn.k_proj.bias"] == P("tensor")
  cfg = config_lib.sde_model_config(tiny_sde_config(batch_size=2, total_steps=1, disc_start=0))
  sde_specs = _param_specs(lambda: sde.SDETokenizer(cfg, rngs=nnx.Rngs(0)), mesh)
  assert sde_specs["quantizer.codebook"] == P(None, None)
  assert sde_specs["pixel_decoder.conv_out.kernel"] == P(None, None, None, None)  # 3 channels
  conv = sde_specs["pixel_decoder.conv_in.kernel"]                       # [3, 3, z, ch]
  assert conv == P(None, None, None, "fsdp")


def test_mesh_shapes_and_errors():
  devices = jax.devices() * 8          # the shape logic only counts devices
  c = sharding.mesh_config(data=-1, fsdp=2, tensor=2)
  assert sharding._fill([c.data, c.fsdp, c.tensor], len(devices), "device") == [2, 2, 2]
  with pytest.raises(sharding.MeshError, match=r"needs 12 devices but there are 8"):
    sharding._fill([3, 2, 2], 8, "device")
  with pytest.raises(sharding.MeshError, match="cannot fill 8 devices"):
    sharding._fill([-1, 3, 1], 8, "device")
  with pytest.raises(sharding.MeshError, match="at most one -1"):
    sharding._fill([-1, -1, 1], 8, "device")
  mesh = sharding.make_mesh(sharding.mesh_config())
  assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == jax.device_count()


SDE = os.path.join(HERE, "multidevice", "sde_steps.py")
LLM = os.path.join(HERE, "multidevice", "llm_steps.py")
MESHES = ("8,1,1", "1,8,1", "2,2,2", "1,2,4")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every multi-device run, started at once (they are independent processes, and
  compiling dominates: running them side by side keeps both cores busy)."""
  tmp = tmp_path_factory.mktemp("meshes")
  port = _free_port()
  jobs = {
      "sde_single": (SDE, 1, ["--meshes=1,1,1", "--save_on=1,1,1", "--restore_onto=1,1,1"]),
      "sde_a": (SDE, 8, ["--meshes=2,2,2:1,8,1", "--save_on=2,2,2", "--restore_onto=1,8,1"]),
      "sde_b": (SDE, 8, ["--meshes=8,1,1:1,2,4"]),
      "llm": (LLM, 8, ["--meshes=1,1,1:" + ":".join(MESHES), "--save_on=2,2,2",
                       "--restore_onto=1,8,1"]),
  }
  for i in range(2):
    jobs[f"llm_process{i}"] = (LLM, 4, ["--meshes=2,2,2", "--save_on=2,2,2",
                                        "--restore_onto=1,8,1", "--num_processes=2",
                                        f"--process_id={i}", f"--port={port}"])
  procs = {}
  for name, (script, devices, flags) in jobs.items():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    group = name.rstrip("0123456789")     # the two processes share a workdir and output
    log = open(tmp / f"{name}.log", "w")
    procs[name] = (subprocess.Popen(
        [sys.executable, script, f"--workdir={tmp / group}", f"--out={tmp / group}.npz",
         *flags], env=env, stdout=log, stderr=subprocess.STDOUT), log)
  failed = []
  for name, (proc, log) in procs.items():
    try:
      code = proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
      proc.kill()
      code = "timeout"
    log.close()
    if code != 0:
      failed.append(f"{name} exited {code}:\n" + (tmp / f"{name}.log").read_text()[-3000:])
  assert not failed, "\n\n".join(failed)
  return {name: np.load(tmp / f"{name}.npz")
          for name in ("sde_single", "sde_a", "sde_b", "llm", "llm_process")}


def _assert_same_params(a, prefix_a, b, prefix_b, atol):
  names = [n for n in a.files if n.startswith(prefix_a + "/") and "params" in n]
  assert names
  for name in names:
    np.testing.assert_allclose(a[name], b[name.replace(prefix_a, prefix_b, 1)], atol=atol,
                               err_msg=name)


def _assert_shard_shape(run, mesh, name, divisors):
  """The first device holds ``shape // divisors`` of parameter ``name`` on ``mesh``."""
  shape = tuple(int(d) for d in run[f"{mesh}/{name}_shape"])
  assert all(d % k == 0 for d, k in zip(shape, divisors)), (name, shape, divisors)
  expected = tuple(d // k for d, k in zip(shape, divisors))
  assert tuple(run[f"{mesh}/{name}_shard_shape"]) == expected, name


@pytest.mark.parametrize("mesh", MESHES)
def test_sde_steps_on_mesh_match_single_device(runs, mesh):
  """3 steps of generator + discriminator on each 8-device mesh against one device."""
  single = runs["sde_single"]
  sharded = runs["sde_a"] if mesh in ("2,2,2", "1,8,1") else runs["sde_b"]
  assert int(single["devices"]) == 1 and int(sharded["devices"]) == 8
  np.testing.assert_allclose(sharded[f"{mesh}/loss"], single["1,1,1/loss"], rtol=1e-5)
  # Absolute bound: attention key biases have zero gradient in exact arithmetic
  # (softmax ignores them) and Adam turns their rounding noise into small steps,
  # so their relative error is meaningless. Seen: at most 3e-6.
  _assert_same_params(sharded, mesh, single, "1,1,1", atol=1e-4)
  # the image encoder's MLP kernel [embed 32, mlp 64]: embed over fsdp, mlp over tensor
  data, fsdp, tensor = (int(x) for x in mesh.split(","))
  assert tuple(sharded[f"{mesh}/fc1_shard_shape"]) == (32 // fsdp, 64 // tensor)
  # frozen weights follow the same rules unless config.replicate_frozen (set on 1,8,1)
  frozen = (32, 64) if mesh == "1,8,1" else (32 // fsdp, 64 // tensor)
  assert tuple(sharded[f"{mesh}/frozen_fc1_shard_shape"]) == frozen
  # conv kernel [kh, kw, in, out]: conv_out over fsdp; the codebook stays whole
  _assert_shard_shape(sharded, mesh, "conv", (1, 1, 1, fsdp))
  _assert_shard_shape(sharded, mesh, "codebook", (1, 1))


def test_sde_checkpoint_from_2x2x2_resumes_on_1x8x1(runs):
  """The (2,2,2) run's checkpoint (state and data iterator) continues on (1,8,1) with
  the loss an uninterrupted single-device run has at that step."""
  np.testing.assert_allclose(runs["sde_a"]["resumed/loss"], runs["sde_single"]["resumed/loss"],
                             rtol=1e-5)


@pytest.mark.parametrize("mesh", MESHES)
def test_llm_steps_on_mesh_match_single_device(runs, mesh):
  llm = runs["llm"]
  np.testing.assert_allclose(llm[f"{mesh}/loss"], llm["1,1,1/loss"], rtol=1e-5)
  # lr 1e-2: every step moves a parameter by ~1e-2; seen differences <= 2e-4
  _assert_same_params(llm, mesh, llm, "1,1,1", atol=5e-4)
  # embedding [vocab, embed], LM head [embed, vocab], k_proj [embed, kv_heads x head_dim]
  _, fsdp, tensor = (int(x) for x in mesh.split(","))
  _assert_shard_shape(llm, mesh, "embedding", (tensor, fsdp))
  _assert_shard_shape(llm, mesh, "lm_head", (fsdp, tensor))
  _assert_shard_shape(llm, mesh, "k_proj", (fsdp, tensor))


def test_fsdp8_holds_an_eighth_of_the_parameters_per_device(runs):
  llm = runs["llm"]
  total = int(llm["1,8,1/param_bytes"])
  assert int(llm["1,1,1/param_bytes_per_device"]) == total
  # only the norm scales (a few hundred floats) stay replicated
  assert total / 8 <= int(llm["1,8,1/param_bytes_per_device"]) <= total / 8 * 1.02


def test_llm_checkpoint_from_2x2x2_continues_on_1x8x1(runs):
  llm = runs["llm"]
  np.testing.assert_allclose(llm["resumed/loss"], llm["saved/next_loss"], rtol=1e-6)
  assert tuple(llm["resumed/fc_shard_shape"]) == (64 // 8, 128)   # gate_proj [embed, mlp]


def test_two_processes_match_one_process(runs):
  """jax.distributed on localhost, 2 processes x 4 devices, mesh (2,2,2), each process
  feeding only its own rows; then a collective save and a restore onto (1,8,1)."""
  two, one = runs["llm_process"], runs["llm"]
  assert int(two["processes"]) == 2 and int(two["devices"]) == 8
  np.testing.assert_allclose(two["2,2,2/loss"], one["2,2,2/loss"], rtol=1e-5)
  _assert_same_params(two, "2,2,2", one, "2,2,2", atol=5e-4)
  np.testing.assert_allclose(two["resumed/loss"], one["resumed/loss"], rtol=1e-5)


def test_activation_constraints_only_under_a_mesh():
  """Models pin their block outputs only while a trainer traces them under
  ``activation_sharding`` (models know nothing of meshes)."""
  from flax import nnx
  from jax.sharding import NamedSharding
  from muse_jax.models import layers, qwen2
  config = qwen2.Qwen2Config(vocab_size=64, hidden_size=16, num_layers=3, num_heads=2,
                             num_kv_heads=1, mlp_dim=32)
  model = qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  forward = lambda state, ids: nnx.merge(graphdef, state)(ids)
  ids = jax.numpy.zeros((2, 8), jax.numpy.int32)
  mesh = sharding.make_mesh(sharding.mesh_config(), jax.devices()[:1])
  seen = []

  def resolver(names, shape):
    seen.append((names, tuple(shape)))
    return NamedSharding(mesh, sharding.logical_to_mesh(names, shape, mesh))

  jax.make_jaxpr(forward)(state, ids)
  assert not seen
  with layers.activation_sharding(resolver):
    # a new function: traces are cached per function, which is why trainers set the
    # context inside the jitted function (sharding.jit_sharded), never around a call
    jax.make_jaxpr(lambda *a: forward(*a))(state, ids)
  # the embedding output and every layer's output: the residual stream; and in each layer
  # the placement of the attention queries, which per-shard kernels read (kernels/attention.py)
  residual = (("batch", "seq", "act_embed"), (2, 8, 16))
  queries = (("batch", "seq", "heads", None), (2, 8, 2, 8))
  assert seen == [residual] + [queries, residual] * config.num_layers
  assert sharding.logical_to_mesh(("batch", "seq", "act_embed"), (16, 8, 64),
                                  _FakeMesh(2, 4, 2)) == P(("data", "fsdp"), None, None)

"""Mesh construction, logical-axis rules, and 1-device vs 8-device equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpost import sharding as sh
from jaxpost.platform import platform
from jaxpost.models import Transformer, init_params, tiny


def test_mesh_config_fills_the_rest_and_names_bad_sizes():
    assert sh.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    assert sh.MeshConfig().shape(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="at most one axis"):
        sh.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sh.MeshConfig(data=2, fsdp=4, tensor=2).shape(8)
    with pytest.raises(ValueError, match="not divisible"):
        sh.MeshConfig(data=3).shape(8)


def test_make_mesh_has_auto_axes():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == sh.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    one = sh.make_mesh(devices=jax.devices()[:1])
    assert one.size == 1


def test_logical_to_spec_follows_rules_and_replicates_indivisible_dims():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    assert sh.logical_to_spec(("layers", "embed", "heads"), (2, 64, 64), mesh) == P(None, "fsdp", "tensor")
    assert sh.logical_to_spec(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
    # 6 rows divide by data (2) but not data*fsdp (4): keep the outer axis only.
    assert sh.logical_to_spec(("batch", None), (6, 5), mesh) == P("data", None)
    assert sh.logical_to_spec(("vocab", "embed"), (255, 63), mesh) == P(None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sh.logical_to_spec(("nonsense",), (4,), mesh)


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (jit, scan, remat) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def test_platform_follows_the_mesh_not_the_default_backend():
    """`jaxpost.platform.platform()` decides the per-platform choices: the mesh's
    devices, the mesh being traced under, else the default backend. Under an abstract
    TPU mesh on this CPU the model scans its 3 layers (a scan unrolled once) and its
    head's backward is XLA's own; under a CPU mesh the layers' scan is fully unrolled and
    the head's backward is the custom product (its optimization barrier)."""
    from flax import linen as nn
    from jax.sharding import AbstractDevice, AbstractMesh
    mesh = sh.make_mesh(devices=jax.devices()[:1])
    assert platform(mesh) == "cpu"
    assert platform() == jax.default_backend()
    tpu = AbstractMesh((1, 1, 1), sh.MESH_AXES,
                       abstract_device=AbstractDevice("TPU v5 lite", None, "tpu"))
    cfg = tiny("llama", vocab_size=64, hidden_size=32, num_layers=3)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((1, 4), jnp.int32)

    def loss(p):
        return Transformer(cfg).apply({"params": p}, tokens).sum()

    seen = {}
    for name, context in (("tpu", lambda: jax.sharding.use_abstract_mesh(tpu)),
                          ("cpu", lambda: sh.logical_rules(mesh))):
        with context(), nn.logical_axis_rules(sh.DEFAULT_RULES):
            assert platform() == name and cfg.scans_layers() == (name != "cpu")
            eqns = list(_equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
        seen[name] = ({e.params["unroll"] for e in eqns
                       if e.primitive.name == "scan" and e.params["length"] == 3},
                      {e.primitive.name for e in eqns})
    assert seen["tpu"][0] == {1} and seen["cpu"][0] == {3}  # the scan over the layers
    assert "optimization_barrier" not in seen["tpu"][1]
    assert "optimization_barrier" in seen["cpu"][1]


# llama at 12 positions in the fast suite; the rest (~6-7 s each) with the slow tests. At
# 128 positions the cache-free attention runs in 2 causal query blocks.
@pytest.mark.parametrize("family,length", [
    ("llama", 12), pytest.param("llama", 128, marks=pytest.mark.slow),
    pytest.param("qwen2", 12, marks=pytest.mark.slow),
    pytest.param("qwen3", 12, marks=pytest.mark.slow)])
def test_logits_on_8_devices_equal_1_device(family, length):
    cfg = tiny(family)
    params = init_params(cfg, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, length), 0, 256,
                                           dtype=jnp.int32))
    ref = Transformer(cfg).apply({"params": params}, tokens)

    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = sh.param_shardings(cfg, mesh)
    assert shardings["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    placed = sh.shard_params(params, shardings)
    batch = sh.shard_batch(tokens, mesh)
    assert batch.sharding.spec == P(("data", "fsdp"), None)

    def forward(p, t):
        with sh.logical_rules(mesh):
            return Transformer(cfg).apply({"params": p}, t)

    out_sharding = sh.logical_to_shardings(("batch", None, "vocab"), ref, mesh)
    out = jax.jit(forward, in_shardings=(shardings, batch.sharding),
                  out_shardings=out_sharding)(placed, batch)
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)

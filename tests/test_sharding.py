"""Mesh construction, logical-axis rules, and 1-device vs 8-device equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpost import sharding as sh
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

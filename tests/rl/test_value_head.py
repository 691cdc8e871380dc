"""PPO's value head (jaxpost.rl.value_head): one pass = the separate computations, where
the value loss's gradient goes, and how freeze rules and LoRA treat the head."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import sharding as sh
from jaxpost.models import Transformer, init_params, tiny
from jaxpost.peft import partition
from jaxpost.rl import ppo
from jaxpost.rl import reward_model as rm
from jaxpost.rl import value_head as vh
from jaxpost.rl.rollout import build_rows, completion_logprobs
from jaxpost.train.common import ModelSection, model_init
from jaxpost.train.ppo import PPOConfig, PPOSection, params_plan

CFG = tiny("llama", num_layers=1, vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2,
           num_kv_heads=1)
P, C = 5, 4
# The separate critic compiles a second trunk: slow-marked to keep the fast suite fast.
VALUE_MODELS = ("shared", pytest.param("separate", marks=pytest.mark.slow))


def _rows(seed=0, n=4):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, 64, rng.integers(2, P + 1))) for _ in range(n)]
    lengths = rng.integers(1, C + 1, n)
    return build_rows(prompts, rng.integers(1, 64, (n, C)).astype(np.int32), lengths, P, 0)


def _params(value_model, std=0.5):
    policy = init_params(CFG, jax.random.key(0))
    params = vh.init_value_params(CFG, policy, value_model, jax.random.key(1), std)
    if value_model == "separate":  # a critic that differs from the policy
        params[vh.CRITIC][rm.BACKBONE] = init_params(CFG, jax.random.key(2))
    return params


@pytest.mark.slow  # the one pass itself: tests/models/test_transformer.py (with_hidden)
@pytest.mark.parametrize("value_model", vh.VALUE_MODELS)
def test_logits_and_values_from_one_pass_equal_the_separate_computations(value_model):
    params = _params(value_model)
    rows = _rows()
    # The values: the reward model's head on every position's hidden state (of the
    # critic when there is one), read at the position that predicts each token.
    trunk, head = ((params[vh.POLICY], params[vh.HEAD]) if value_model == "shared" else
                   (params[vh.CRITIC][rm.BACKBONE], params[vh.CRITIC][rm.HEAD]))

    @jax.jit  # both ways in one program: one compilation
    def both(params, trunk, rows):
        one_pass = vh.completion_outputs(CFG, params, rows, P, C, 0.7)
        logp = completion_logprobs(CFG, params[vh.POLICY], rows, P, C, 0.7)
        hidden = Transformer(CFG).apply({"params": trunk}, rows["tokens"],
                                        positions=rows["positions"],
                                        segment_ids=rows["segment_ids"], return_hidden=True)
        return one_pass, logp, hidden

    (logp, logits, values), want_logp, hidden = both(params, trunk, rows)
    chex.assert_shape((logp, values), (4, C))
    chex.assert_shape(logits, (4, C, CFG.vocab_size))
    chex.assert_trees_all_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    want = np.asarray(hidden) @ np.asarray(head["kernel"])[:, 0] + float(head["bias"][0])
    chex.assert_trees_all_close(values, want[:, P - 1:P + C - 1], rtol=1e-5, atol=1e-5)
    assert vh.value_model_of(params) == value_model


def _nonzero(tree):
    return jax.tree.map(lambda g: bool(np.any(np.asarray(g) != 0)), tree)


@pytest.mark.parametrize("value_model", VALUE_MODELS)
def test_value_loss_gradient_reaches_only_the_value_head_and_its_trunk(value_model):
    params = _params(value_model)
    rows = _rows(1)
    mask = jnp.asarray(rows["completion_mask"])
    target = jnp.ones_like(mask)

    def value_objective(p_):
        _, _, values = vh.completion_outputs(CFG, p_, rows, P, C, 1.0)
        s, _, _ = ppo.value_loss(values, jnp.zeros_like(values), target, mask, 10.0)
        return s

    def policy_objective(p_):
        logp, _, _ = vh.completion_outputs(CFG, p_, rows, P, C, 1.0)
        return jnp.sum(logp * mask)

    grads = jax.jit(lambda p_: (jax.grad(value_objective)(p_), jax.grad(policy_objective)(p_)))
    g_value, g_policy = map(_nonzero, grads(params))
    if value_model == "shared":
        assert g_value[vh.HEAD] == {"kernel": True, "bias": True}
        assert g_value[vh.POLICY]["layers"]["mlp"]["up_proj"]["kernel"]
        assert g_value[vh.POLICY]["embed_tokens"]["embedding"]
        assert not g_value[vh.POLICY]["lm_head"]["kernel"]  # values never read the LM head
        assert not any(jax.tree.leaves(g_policy[vh.HEAD]))
    else:
        assert not any(jax.tree.leaves(g_value[vh.POLICY]))  # the policy gets no value loss
        assert all(jax.tree.leaves(g_value[vh.CRITIC][rm.HEAD]))
        assert g_value[vh.CRITIC][rm.BACKBONE]["layers"]["mlp"]["up_proj"]["kernel"]
        assert not any(jax.tree.leaves(g_policy[vh.CRITIC]))  # ... nor the critic policy loss
        assert g_policy[vh.POLICY]["lm_head"]["kernel"]


def _plan(value_model="shared", **over):
    cfg = PPOConfig(workdir="w", ppo=PPOSection(value_model=value_model, prompts_per_step=2,
                                                num_ppo_epochs=1), checkpoint_every=1, **over)
    mesh = sh.make_mesh(sh.MeshConfig(), jax.devices()[:1])
    section = ModelSection(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1, head_dim=8, vocab_size=64)
    from jaxpost.train.common import model_config
    model_cfg = model_config(section, 64)
    return params_plan(cfg, model_cfg, model_init(section, model_cfg, mesh, 0)[0], mesh)


def _mask_of(plan, *path):
    node = plan.mask
    for k in path:
        node = node[k]
    return node


def test_value_head_trains_under_lora_and_trainable_rules_unless_frozen_by_name():
    from jaxpost.peft.lora import LoraConfig

    lora = _plan(lora=LoraConfig(rank=2, targets=("q_proj",)))
    assert _mask_of(lora, vh.HEAD) == {"kernel": True, "bias": True}
    assert _mask_of(lora, vh.POLICY, "layers", "mlp", "up_proj", "kernel") is False
    assert np.all(_mask_of(lora, vh.POLICY, "layers", "self_attn", "q_proj", "lora_a"))
    only_q = _plan(trainable=("q_proj",))
    assert _mask_of(only_q, vh.HEAD) == {"kernel": True, "bias": True}
    assert _mask_of(only_q, vh.POLICY, "lm_head", "kernel") is False
    frozen = _plan(freeze=(r"^score\.",))
    assert _mask_of(frozen, vh.HEAD) == {"kernel": False, "bias": False}
    # A separate critic: rules anchored at the policy's names pick the policy only.
    critic = _plan("separate", freeze=(r"^model\.", r"^lm_head\."))
    assert _mask_of(critic, vh.POLICY, "lm_head", "kernel") is False
    assert _mask_of(critic, vh.POLICY, "embed_tokens", "embedding") is False
    assert _mask_of(critic, vh.CRITIC, rm.HEAD) == {"kernel": True, "bias": True}
    assert _mask_of(critic, vh.CRITIC, rm.BACKBONE, "embed_tokens", "embedding") is True
    counts = partition.count_params(critic.abstract, critic.mask)
    assert counts.trainable == sum(np.prod(x.shape) for x in
                                   jax.tree.leaves(critic.abstract[vh.CRITIC]))

"""The TRL 1.16 GRPO knobs in the recipe: TR-DPO's synced reference and the adaptive
entropy coefficient survive a preemption exactly (both are checkpointed), with GDPO
aggregation and sequence-level importance sampling on."""

import dataclasses
import json

import numpy as np
import pytest

from jaxpost.train.grpo import train
from tests.train.test_grpo import _small_grpo


def _run(workdir, first_reward):
    cfg = _small_grpo(workdir, steps=4, reward_weights=(1.0, 0.5), reward_fns=(
        first_reward, "tests.train.test_grpo:digit_fraction"))
    grpo = dataclasses.replace(
        cfg.grpo, num_iterations=1, loss_type="grpo", importance_sampling_level="sequence",
        multi_objective_aggregation="normalize_then_sum", sync_ref_model=True,
        ref_model_mixup_alpha=1.0, ref_model_sync_steps=2, use_adaptive_entropy=True,
        entropy_coef=0.01, entropy_coef_delta=0.01, entropy_target=100.0)
    return train(dataclasses.replace(cfg, grpo=grpo))


@pytest.mark.slow
def test_synced_reference_and_adaptive_entropy_resume_exactly(tmp_path):
    _run(tmp_path / "straight", "tests.train.test_grpo:digit_fraction")
    # SIGTERM in the 3rd rollout's reward call: step 2 (just synced) is saved, the
    # resumed run replays steps 3 and 4 with the restored reference and coefficient.
    first = _run(tmp_path / "killed", "tests.train.test_grpo:preempt_on_call(call=3)")
    assert first.preempted and int(first.state.step) == 2
    _run(tmp_path / "killed", "tests.train.test_grpo:digit_fraction")
    straight, resumed = ([json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")]
                         for d in ("straight", "killed"))
    assert [x["step"] for x in resumed] == [1, 2, 3, 4]
    # alpha = 1: after step 2 the reference is the policy, so step 3 starts at KL 0.
    kl = [x["kl"] for x in straight]
    assert kl[0] < 1e-6 and kl[1] > 1e-5 and kl[2] < 1e-6 and kl[3] > 1e-5, kl
    # entropy far below the target: the coefficient rises by delta after every step and
    # applies from step 2 on (TRL applies none before the first measurement).
    np.testing.assert_allclose([x["entropy_coef"] for x in straight], [0.02, 0.03, 0.04, 0.05])
    assert "rewards/digit_fraction/mean" in straight[0]
    for a, b in zip(straight, resumed):
        for k in ("loss", "kl", "grad_norm", "entropy_coef", "policy_loss"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {a['step']} {k}")

"""Reward specs, RewardSet aggregation and errors, and the built-in reward functions."""

import sys
import types

import numpy as np
import pytest

from jaxpost.rl import rewards
from jaxpost.rl.rewards import (
    RewardFunctionError,
    RewardSet,
    RewardSpecError,
    exact_answer,
    extract_answer,
    format_reward,
    resolve_reward,
    soft_overlong_penalty,
)


@pytest.fixture()
def fake_module(monkeypatch):
    """A module `fake_rewards` with reward functions for the spec tests."""
    mod = types.ModuleType("fake_rewards")

    def const(prompts, completions, **_):
        return [0.5] * len(completions)

    def length_over(threshold):
        def reward(prompts, completions, **_):
            return [float(len(c) > threshold) for c in completions]
        return reward

    def needs_answer(prompts, completions, *, answer, **_):
        return [None if a is None else float(c == a) for c, a in zip(completions, answer)]

    def boom_on_x(prompts, completions, **_):
        out = []
        for c in completions:
            if "x" in c:
                raise KeyError("no x allowed")
            out.append(1.0)
        return out

    mod.const, mod.length_over, mod.needs_answer, mod.boom_on_x = (
        const, length_over, needs_answer, boom_on_x)
    mod.not_callable = 3
    mod.bad_factory = lambda **kw: "not a function"
    mod.ns = types.SimpleNamespace(const=const)
    monkeypatch.setitem(sys.modules, "fake_rewards", mod)
    return mod


# ----------------------------------------------------------------------------------- specs
def test_resolve_plain_spec(fake_module):
    name, fn = resolve_reward("fake_rewards:const")
    assert name == "const" and fn is fake_module.const
    name, fn = resolve_reward("  fake_rewards : ns.const ")
    assert name == "const" and fn is fake_module.const
    name, fn = resolve_reward("jaxpost.data.synthetic:addition_reward")
    assert name == "addition_reward" and fn(["p"], ["405<eos>"], answer=["405"]) == [1.0]


def test_resolve_factory_spec_parses_literal_kwargs(fake_module):
    name, fn = resolve_reward("fake_rewards:length_over(threshold=3)")
    assert name == "length_over"
    assert fn(["p", "p"], ["ab", "abcd"]) == [0.0, 1.0]
    name, fn = resolve_reward("jaxpost.rl.rewards:soft_overlong_penalty("
                              "max_completion_length=100, cache_length=20)")
    assert name == "soft_overlong_penalty"
    assert fn(["p"], ["c"], completion_lengths=[90]) == [-0.5]


@pytest.mark.parametrize("spec, match", [
    ("fake_rewards.const", "malformed"),
    ("fake_rewards:", "malformed"),
    ("fake_rewards:length_over(threshold=3", "malformed"),
    ("fake_rewards:length_over(3)", "key=value"),
    ("fake_rewards:length_over(threshold=len)", "not a Python literal"),
    ("fake_rewards:length_over(threshold=)", "cannot parse"),
    ("no_such_module_xyz:fn", "importing module 'no_such_module_xyz' failed"),
    ("fake_rewards:missing", "has no attribute 'missing'"),
    ("fake_rewards:not_callable", "not a callable reward function"),
    ("fake_rewards:not_callable(a=1)", "not callable"),
    ("fake_rewards:bad_factory(a=1)", "must return the reward function"),
    ("fake_rewards:length_over(limit=3)", "raised TypeError"),
])
def test_resolve_errors_name_the_spec(fake_module, spec, match):
    with pytest.raises(RewardSpecError, match=match) as e:
        resolve_reward(spec)
    assert repr(spec) in str(e.value)


def test_module_raising_at_import_is_reported(monkeypatch, tmp_path):
    (tmp_path / "raises_on_import_mod.py").write_text("raise RuntimeError('bad import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardSpecError, match="RuntimeError: bad import"):
        resolve_reward("raises_on_import_mod:fn")


# ------------------------------------------------------------------------------ RewardSet
def test_reward_set_weights_and_none_handling(fake_module):
    rs = RewardSet(("fake_rewards:const", "fake_rewards:needs_answer"), (2.0, 3.0))
    total, per = rs(["p"] * 3, ["a", "b", "c"], {"answer": ["a", None, "x"]})
    assert rs.names == ["const", "needs_answer"]
    np.testing.assert_array_equal(per["const"], [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(per["needs_answer"], [1.0, np.nan, 0.0])
    # Row 1: needs_answer returned None, so only const counts (not a silent 0 * NaN).
    np.testing.assert_allclose(total, [2 * 0.5 + 3 * 1.0, 2 * 0.5, 2 * 0.5])


def test_all_none_row_gives_nan_total(fake_module):
    rs = RewardSet(["fake_rewards:needs_answer"])
    total, _ = rs(["p", "p"], ["a", "b"], {"answer": [None, "b"]})
    assert np.isnan(total[0]) and total[1] == 1.0
    metrics = rewards.reward_metrics(total, _)
    assert metrics["reward_mean"] == 1.0 and metrics["rewards/needs_answer/mean"] == 1.0


def test_duplicate_names_are_deduplicated(fake_module):
    rs = RewardSet(("fake_rewards:length_over(threshold=1)",
                    "fake_rewards:length_over(threshold=2)", "fake_rewards:const"))
    assert rs.names == ["length_over", "length_over_2", "const"]
    _, per = rs(["p"], ["abc"])
    assert set(per) == {"length_over", "length_over_2", "const"}


def test_weights_length_mismatch_is_an_error_at_construction(fake_module):
    with pytest.raises(ValueError, match="2 reward_weights .* for 1 reward_fns"):
        RewardSet(("fake_rewards:const",), (1.0, 2.0))
    with pytest.raises(ValueError, match="at least one"):
        RewardSet(())


def test_exception_names_function_and_first_failing_example(fake_module):
    rs = RewardSet(("fake_rewards:const", "fake_rewards:boom_on_x"))
    completions = ["fine", "also fine", "has an x " + "y" * 400, "x again"]
    with pytest.raises(RewardFunctionError) as e:
        rs(["prompt %d" % i for i in range(4)], completions)
    msg = str(e.value)
    assert "'boom_on_x'" in msg and "example 2 of 4" in msg and "no x allowed" in msg
    assert "prompt 2" in msg and "has an x" in msg and " ... " in msg  # shortened
    assert e.value.function == "boom_on_x" and e.value.index == 2
    assert isinstance(e.value.__cause__, KeyError)


def test_batch_only_failure_is_reported(fake_module):
    def needs_two(prompts, completions, **_):
        if len(completions) < 2:
            return [1.0] * len(completions)
        raise ValueError("batch too big")
    with pytest.raises(RewardFunctionError, match="on no single example"):
        RewardSet((needs_two,))(["p", "p"], ["a", "b"])


@pytest.mark.parametrize("returned, match", [
    ([1.0], "returned 1 values for 2 completions"),
    (1.0, "returned a float"),
    ([1.0, "1.0"], r"returned '1.0' \(str\) for example 1"),
    ([1.0, float("inf")], "must be finite"),
])
def test_bad_return_values_name_the_function(returned, match):
    def bad(prompts, completions, **_):
        return returned
    with pytest.raises(RewardFunctionError, match=match) as e:
        RewardSet((bad,))(["p", "p"], ["a", "b"])
    assert "'bad'" in str(e.value)


def test_numpy_and_bool_values_are_accepted():
    def fn(prompts, completions, **_):
        return [np.int64(1), np.float32(0.25)]
    total, _ = RewardSet((fn, lambda p, c, **_: [True, False]))(["p", "p"], ["a", "b"])
    np.testing.assert_allclose(total, [2.0, 0.25])


def test_column_length_mismatch_is_an_error(fake_module):
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        RewardSet(("fake_rewards:const",))(["p", "p"], ["a", "b"], {"answer": ["a"]})


# ------------------------------------------------------------------------------ built-ins
@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}. Then 7", "42"),
    ("\\boxed{1} first, finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("work...\n#### 1,234\nmore text 9", "1,234"),
    ("#### $72 dollars", "72"),
    ("I think 3 plus 4 is 7.", "7"),
    ("the total is -15", "-15"),
    ("costs 1,000,000.50 in all", "1,000,000.50"),
    ("405<eos>junk 9", "405"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_exact_answer_on_hand_made_strings():
    completions = ["The answer is \\boxed{1,234}.",       # boxed with comma
                   "blah 12 then\n#### 72.0",             # #### with trailing .0
                   "3 apples and then -5",                # last number, negative
                   "we get 17",                           # wrong
                   "anything",                            # no answer -> None
                   "405<eos>",                            # plain exact match
                   "\\boxed{ x + 1 }",                    # non-numeric boxed
                   "no number at all",                    # nothing to extract
                   "the result: 1234"]
    answers = ["1234", "72", "-5", "18", None, "405", "x+1", "3",
               "Some reasoning <<2*617=1234>>\n#### 1,234"]  # GSM8K-style gold solution
    out = exact_answer(["p"] * len(completions), completions, answer=answers)
    assert out == [1.0, 1.0, 1.0, 0.0, None, 1.0, 1.0, 0.0, 1.0]
    assert exact_answer(["p"], ["x"], answer=[""]) == [None]
    with pytest.raises(ValueError, match="'answer' column"):
        exact_answer(["p"], ["x"])


def test_format_reward():
    good = ["<think>step 1\nstep 2</think>\n<answer>42</answer>",
            "  <think>a</think><answer>b</answer>\n<eos>padding"]
    bad = ["<answer>42</answer>", "<think>a</think> trailing <answer>b</answer>",
           "<think>a</think>\n<answer>b</answer> extra", "plain"]
    assert format_reward(["p"] * 6, good + bad) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_soft_overlong_penalty_numbers():
    fn = soft_overlong_penalty(max_completion_length=100, cache_length=20)
    lengths = [10, 80, 81, 90, 100, 101, 500]
    out = fn(["p"] * 7, ["c"] * 7, completion_lengths=lengths, truncated=[False] * 7)
    np.testing.assert_allclose(out, [0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0])
    assert soft_overlong_penalty(100, 0)(["p"] * 2, ["c"] * 2,
                                         completion_lengths=[100, 101]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="cache_length=120"):
        soft_overlong_penalty(100, 120)
    with pytest.raises(ValueError, match="'completion_lengths' column"):
        fn(["p"], ["c"])
    # Combined as in DAPO: correctness + length penalty, weights (1, 1).
    rs = RewardSet((exact_answer, fn))
    total, _ = rs(["p", "p"], ["\\boxed{3}", "\\boxed{4}"],
                  {"answer": ["3", "3"], "completion_lengths": [90, 50]})
    np.testing.assert_allclose(total, [0.5, 0.0])


def test_require_some_reward_refuses_a_batch_no_function_scored(fake_module):
    rs = RewardSet(("fake_rewards:needs_answer", "fake_rewards:needs_answer"))
    total, per = rs(["p", "q"], ["a", "b"], {"answer": [None, None]})
    with pytest.raises(RewardFunctionError, match=r"batch of 2 has a reward.*needs_answer 2/2, "
                                                  r"needs_answer_2 2/2") as e:
        rewards.require_some_reward(total, per, ["p", "q"], ["a", "b"])
    assert e.value.function == "needs_answer, needs_answer_2"
    total, per = rs(["p", "q"], ["a", "b"], {"answer": [None, "b"]})
    rewards.require_some_reward(total, per, ["p", "q"], ["a", "b"])  # one row scored: fine

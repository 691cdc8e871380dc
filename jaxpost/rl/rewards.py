"""Reward functions: the TRL convention, config specs, weighted sets and built-ins.

A reward function is `fn(prompts: list[str], completions: list[str], **columns) ->
list[float | None]`, one value per completion; None means "this function does not apply
to this row" (e.g. a math verifier on a code prompt). Host-side Python, never inside jit.

Columns: the GRPO trainer calls every function with the dataset's other fields of each
row (`answer`, ...) as keyword lists aligned with `completions` (a prompt's fields
repeated for each of its G completions), plus always:

- `completion_lengths: list[int]`: completion tokens generated (EOS included if emitted),
- `truncated: list[bool]`: whether generation hit `max_completion_length` without EOS.

Accept `**kwargs` to ignore columns you do not use.

Config specs (`reward_fns` in a recipe, a tuple of strings):

- `"package.module:function"`: the function itself.
- `"package.module:factory(key=value, ...)"`: the factory is imported and called once
  with the keyword arguments (Python literals, parsed with `ast.literal_eval`) and must
  return the reward function, e.g.
  `"jaxpost.rl.rewards:soft_overlong_penalty(max_completion_length=512, cache_length=128)"`.

`RewardSet` resolves specs, calls every function on a batch, checks what comes back and
combines the results with weights (`sum_k w_k r_k` over the functions that returned a
value; NaN where none did, which `group_advantages` turns into advantage 0). A returned
NaN counts as None; a batch in which no row has any reward is an error
(`require_some_reward`, which the GRPO trainer calls on every rollout batch).
"""

from __future__ import annotations

import ast
import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, Union

import numpy as np

RewardFn = Callable[..., Sequence[Union[float, None]]]

__all__ = ["RewardFn", "RewardSpecError", "RewardFunctionError", "resolve_object", "resolve_reward",
           "RewardSet", "reward_metrics", "require_some_reward", "extract_answer",
           "exact_answer", "format_reward", "soft_overlong_penalty"]


class RewardSpecError(ValueError):
    """A reward spec string cannot be turned into a reward function."""


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something other than a list of numbers/None.

    Attributes:
        function: the function's logging name.
        index: the index in the batch of the offending example, or None if unknown.
    """

    def __init__(self, message: str, function: str, index: int | None = None):
        super().__init__(message)
        self.function = function
        self.index = index


# ---------------------------------------------------------------------------------- specs
_SPEC = re.compile(r"^\s*(?P<module>[A-Za-z_][\w.]*)\s*:\s*(?P<attr>[A-Za-z_][\w.]*)\s*"
                   r"(?P<call>\((?P<args>.*)\))?\s*$", re.DOTALL)
_SPEC_FORMAT = ('"package.module:function" or "package.module:factory(key=value, ...)" '
                "with Python-literal values")


def resolve_reward(spec: Union[str, RewardFn]) -> tuple[str, RewardFn]:
    """Turns a reward spec into `(name, callable)`.

    Args:
        spec: `"package.module:function"`, `"package.module:factory(key=value, ...)"`
            (the factory is called once, here, and must return the reward function), or
            a callable (used as is; convenient in code and tests).

    Returns:
        `(name, fn)`; name is the function's (or factory's) short name, e.g.
        `"exact_answer"` or `"soft_overlong_penalty"`, used in metric names.

    Raises:
        RewardSpecError: naming the spec, on a malformed spec, a module that fails to
            import, a missing attribute, non-literal or positional factory arguments, a
            factory that raises, or a result that is not callable.
    """
    if callable(spec):
        return _short_name(spec), spec
    if not isinstance(spec, str):
        raise RewardSpecError(f"reward spec {spec!r} is a {type(spec).__name__}; expected a "
                              f"string {_SPEC_FORMAT}, or a callable")
    name, obj, called = resolve_object(spec, "reward")
    if called and not callable(obj):
        raise RewardSpecError(f"reward spec {spec!r}: factory {name} returned a "
                              f"{type(obj).__name__}; it must return the reward function")
    if not called and not callable(obj):
        raise RewardSpecError(f"reward spec {spec!r}: {spec} is a {type(obj).__name__}, not "
                              "a callable reward function (a factory needs parentheses: "
                              "'module:factory(key=value)')")
    return name, obj


def resolve_object(spec: str, what: str = "reward") -> tuple[str, Any, bool]:
    """The object a `"package.module:attr"` or `"package.module:factory(key=value)"` spec
    names: `(short name, object, whether a factory was called)`. The one spec parser of
    reward functions and of other pluggable objects (gaze predictors).

    Raises:
        RewardSpecError: naming the spec (as a `what` spec), on a malformed spec, a module
            that fails to import, a missing attribute, non-literal or positional factory
            arguments, a factory that is not callable or that raises.
    """
    m = _SPEC.match(spec)
    if m is None:
        raise RewardSpecError(f"{what} spec {spec!r} is malformed; expected {_SPEC_FORMAT}")
    module_name, attr = m.group("module"), m.group("attr")
    kwargs = _parse_kwargs(spec, m.group("args")) if m.group("call") else None
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises at import
        raise RewardSpecError(f"{what} spec {spec!r}: importing module {module_name!r} failed "
                              f"with {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardSpecError(f"{what} spec {spec!r}: module {module_name!r} has no "
                                  f"attribute {attr!r}")
        obj = getattr(obj, part)
    name = attr.split(".")[-1]
    if kwargs is None:
        return name, obj, False
    if not callable(obj):
        raise RewardSpecError(f"{what} spec {spec!r}: factory {module_name}:{attr} is a "
                              f"{type(obj).__name__}, not callable")
    try:
        obj = obj(**kwargs)
    except Exception as e:
        raise RewardSpecError(f"{what} spec {spec!r}: calling factory {attr}(**{kwargs!r}) "
                              f"raised {type(e).__name__}: {e}") from e
    return name, obj, True


def _parse_kwargs(spec: str, args: str) -> dict[str, Any]:
    """`key=value, ...` -> dict via `ast`, values by `ast.literal_eval`."""
    try:
        call = ast.parse(f"f({args})", mode="eval").body
    except SyntaxError as e:
        raise RewardSpecError(f"reward spec {spec!r}: cannot parse the factory arguments "
                              f"({args}): {e.msg}; expected key=value pairs") from e
    assert isinstance(call, ast.Call)
    if call.args or any(k.arg is None for k in call.keywords):
        raise RewardSpecError(f"reward spec {spec!r}: factory arguments must be key=value "
                              "pairs (no positional arguments, no **)")
    out = {}
    for k in call.keywords:
        try:
            out[k.arg] = ast.literal_eval(k.value)
        except (ValueError, SyntaxError, TypeError) as e:
            raise RewardSpecError(
                f"reward spec {spec!r}: the value of {k.arg!r} ({ast.unparse(k.value)}) is "
                "not a Python literal (number, string, tuple, list, dict, bool, None)") from e
    return out


def _short_name(fn: Any) -> str:
    while hasattr(fn, "func") and not hasattr(fn, "__name__"):  # functools.partial
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


# ------------------------------------------------------------------------------ reward set
class RewardSet:
    """Several reward functions combined with weights.

    Args:
        specs: reward specs (see `resolve_reward`), resolved once here.
        weights: one float per spec, or None for all 1.0.

    Attributes:
        names: logging names, one per function: the short name, with `_2`, `_3`, ...
            appended to repeats.
        weights: float64 `[K]`.

    Raises:
        RewardSpecError: on a bad spec.
        ValueError: on no specs, or weights of the wrong length or not finite.
    """

    def __init__(self, specs: Sequence[Union[str, RewardFn]],
                 weights: Sequence[float] | None = None):
        if isinstance(specs, str) or callable(specs):
            specs = (specs,)
        specs = tuple(specs)
        if not specs:
            raise ValueError("RewardSet needs at least one reward function spec")
        if weights is None:
            weights = (1.0,) * len(specs)
        weights = tuple(weights)
        if len(weights) != len(specs):
            raise ValueError(f"{len(weights)} reward_weights {weights} for {len(specs)} "
                             f"reward_fns {specs}; give one weight per function")
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)):
            raise ValueError(f"reward_weights must be finite numbers, got {weights}")
        self.specs = specs
        self.weights = w
        self.functions: list[RewardFn] = []
        self.names: list[str] = []
        seen: dict[str, int] = {}
        for spec in specs:
            name, fn = resolve_reward(spec)
            seen[name] = seen.get(name, 0) + 1
            self.names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
            self.functions.append(fn)

    def __repr__(self) -> str:
        return f"RewardSet({self.specs!r}, weights={tuple(self.weights.tolist())})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None,
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rewards of a batch.

        Args:
            prompts: N prompt strings (a prompt repeated for each of its completions).
            completions: N completion strings.
            columns: other fields, each a list of N values, passed as keyword arguments.

        Returns:
            `(total, per_function)`: float64 `[N]` weighted sums over the functions that
            returned a value for the row (NaN where none did), and name -> float64 `[N]`
            raw (unweighted) rewards with NaN for None.

        Raises:
            RewardFunctionError: a function raised (naming it and the first failing example)
                or returned a wrong length or a non-numeric value.
            ValueError: prompts, completions and columns differ in length.
        """
        n = len(completions)
        columns = dict(columns or {})
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions; pass one prompt per "
                             "completion (repeat a prompt for each of its completions)")
        for key, col in columns.items():
            if len(col) != n:
                raise ValueError(f"column {key!r} has {len(col)} values for {n} completions")
        prompts, completions = list(prompts), list(completions)
        columns = {k: list(v) for k, v in columns.items()}
        per = {}
        for name, fn in zip(self.names, self.functions):
            per[name] = _call_checked(name, fn, prompts, completions, columns)
        stacked = np.stack([per[k] for k in self.names])  # [K, N]
        weighted = self.weights[:, None] * stacked
        applied = ~np.isnan(stacked)
        total = np.where(applied.any(0), np.where(applied, weighted, 0.0).sum(0), np.nan)
        return total, per


def _call_checked(name: str, fn: RewardFn, prompts: list[str], completions: list[str],
                  columns: dict[str, list]) -> np.ndarray:
    n = len(completions)
    try:
        out = fn(prompts, completions, **columns)
    except Exception as batch_error:
        _raise_first_failing_row(name, fn, prompts, completions, columns, batch_error)
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise RewardFunctionError(f"reward function {name!r} returned a {type(out).__name__}; "
                                  f"expected a list of {n} floats or None", name)
    out = list(out)
    if len(out) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(out)} values for "
                                  f"{n} completions; expected one per completion", name)
    values = np.empty(n, np.float64)
    for i, v in enumerate(out):
        if v is None:
            values[i] = np.nan
        elif isinstance(v, numbers.Real) or (isinstance(v, np.ndarray) and v.shape == ()
                                              and np.issubdtype(v.dtype, np.number)):
            x = float(v)
            if math.isinf(x):
                raise RewardFunctionError(
                    f"reward function {name!r} returned {x} for example {i} "
                    f"(completion {_shorten(completions[i])!r}); rewards must be finite "
                    "(or None)", name, i)
            values[i] = x
        else:
            raise RewardFunctionError(
                f"reward function {name!r} returned {v!r} ({type(v).__name__}) for example {i}; "
                "expected a float or None", name, i)
    return values


def _raise_first_failing_row(name, fn, prompts, completions, columns, batch_error):
    for i in range(len(completions)):
        try:
            fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception as row_error:
            raise RewardFunctionError(
                f"reward function {name!r} raised {type(row_error).__name__}: {row_error}\n"
                f"  on example {i} of {len(completions)}:\n"
                f"  prompt: {_shorten(prompts[i])!r}\n"
                f"  completion: {_shorten(completions[i])!r}", name, i) from row_error
    raise RewardFunctionError(
        f"reward function {name!r} raised {type(batch_error).__name__}: {batch_error} on the "
        f"batch of {len(completions)} examples, but on no single example", name) from batch_error


def _shorten(text: str, limit: int = 160) -> str:
    text = str(text)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def reward_metrics(total: np.ndarray, per_function: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Host-side log metrics: `reward_mean` (of the total) and `rewards/{name}/mean|std`.

    NaN (None) entries are left out; a function that applied to no row gets NaN.
    """
    out = {"reward_mean": _nan_stat(np.nanmean, total)}
    for name, r in per_function.items():
        out[f"rewards/{name}/mean"] = _nan_stat(np.nanmean, r)
        out[f"rewards/{name}/std"] = _nan_stat(np.nanstd, r)
    return out


def require_some_reward(total: np.ndarray, per_function: Mapping[str, np.ndarray],
                        prompts: Sequence[str], completions: Sequence[str]) -> None:
    """Raises unless at least one row of a batch has a reward.

    A batch whose every total is NaN (each function returned None or NaN for each row)
    has advantage 0 everywhere: training on it learns nothing while logging `reward nan`.

    Args:
        total, per_function: what `RewardSet.__call__` returned.
        prompts, completions: the batch (the first example is quoted in the error).

    Raises:
        RewardFunctionError: naming every function and how many rows it left unscored.
    """
    total = np.asarray(total, np.float64)
    if total.size == 0 or np.any(~np.isnan(total)):
        return
    n = total.size
    counts = ", ".join(f"{name} {int(np.sum(np.isnan(np.asarray(r, np.float64))))}/{n}"
                       for name, r in per_function.items())
    raise RewardFunctionError(
        f"no completion of this batch of {n} has a reward: every reward function returned "
        f"None or NaN for every row (None/NaN per function: {counts}), so every advantage "
        "is 0 and nothing can be learned. A NaN counts as None; check the functions and "
        "the dataset columns they read.\n"
        f"  example 0: prompt {_shorten(prompts[0])!r}, completion {_shorten(completions[0])!r}",
        ", ".join(per_function))


def _nan_stat(fn, x) -> float:
    x = np.asarray(x, np.float64)
    return float(fn(x)) if np.any(~np.isnan(x)) else float("nan")


# ------------------------------------------------------------------------------- built-ins
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def _boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    while start >= 0:
        k = start + len("\\boxed")
        while k < len(text) and text[k].isspace():
            k += 1
        if k < len(text) and text[k] == "{":
            depth, j = 0, k
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[k + 1:j]
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer stated in a completion, or None.

    In order: the content of the last `\\boxed{...}`; else what follows the last `####`
    on its line (its first number if the line is more than a number); else the last
    number in the text (`-3`, `1,234.5`, `.5`). The text is
    first cut at the first end-of-generation string (`<eos>`, `<|im_end|>`, ...).
    """
    text = _cut_at_stop(text)
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    k = text.rfind("####")
    if k >= 0:
        line = text[k + 4:].strip().split("\n", 1)[0].strip()
        if _as_number(line) is None:  # "#### $72 dollars" -> "72"
            first = _NUMBER.search(line)
            line = first.group() if first else line
        return line
    numbers_ = _NUMBER.findall(text)
    return numbers_[-1] if numbers_ else None


def _cut_at_stop(text: str) -> str:
    from jaxpost.data.synthetic import DEFAULT_STOP_STRINGS  # lazy: jaxpost.data imports grain
    for s in DEFAULT_STOP_STRINGS:
        k = text.find(s)
        if k >= 0:
            text = text[:k]
    return text


def _as_number(text: str) -> Fraction | None:
    """Exact value of `text` if it is one number (commas, `$`, `a/b` allowed), else None."""
    t = re.sub(r"\s+", "", text).strip("$").rstrip(".")
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t)
    if not re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+|"
                        r"[-+]?\d+/\d+", t):
        return None
    try:
        return Fraction(t.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _same_answer(predicted: str, gold: str) -> bool:
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    norm = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    return norm(predicted) == norm(gold)


def exact_answer(prompts: Sequence[str], completions: Sequence[str], *,
                 answer: Sequence[Any] | None = None, **_: Any) -> list[float | None]:
    """1.0 if the completion's final answer equals the `answer` column, else 0.0.

    The completion's answer is found by `extract_answer` (`\\boxed{}`, then `####`, then the
    last number). A gold answer written as a solution (containing `\\boxed{}` or `####`,
    as in GSM8K) is reduced the same way. Numbers compare exactly as values, so commas,
    whitespace, a `$` and trailing zeros do not matter (`1,234.0 == 1234`, `1/2 == 0.5`);
    other answers compare as strings with whitespace removed. A completion that is exactly
    the answer (`jaxpost.data.synthetic.exact_match`) always counts.

    Args:
        prompts: unused.
        completions: N completions.
        answer: the dataset column, N gold answers; a row whose answer is None or empty
            gets None (this function does not apply to it).

    Returns:
        N values: 1.0, 0.0, or None.

    Raises:
        ValueError: if there is no `answer` column.
    """
    del prompts
    if answer is None:
        raise ValueError("exact_answer needs an 'answer' column in the dataset (the gold "
                         "answer of each prompt); none was passed")
    from jaxpost.data.synthetic import exact_match  # lazy: jaxpost.data imports grain
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        if gold is None or not str(gold).strip():
            out.append(None)
            continue
        gold = str(gold)
        if exact_match(completion, gold):
            out.append(1.0)
            continue
        if "\\boxed" in gold or "####" in gold:
            gold = extract_answer(gold) or gold
        predicted = extract_answer(completion)
        out.append(float(predicted is not None and _same_answer(predicted, gold.strip())))
    return out


_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def format_reward(prompts: Sequence[str], completions: Sequence[str],
                  **_: Any) -> list[float]:
    """1.0 if a completion is `<think>...</think>` then `<answer>...</answer>`, else 0.0.

    The whole completion, cut at the first end-of-generation string and ignoring
    surrounding whitespace, must match `<think>.*?</think>\\s*<answer>.*?</answer>`
    (newlines allowed inside). If the prompt already ends with `<think>`, prepend it to
    the completions yourself or write a variant.
    """
    del prompts
    return [1.0 if _FORMAT.fullmatch(_cut_at_stop(c)) else 0.0 for c in completions]


def soft_overlong_penalty(max_completion_length: int, cache_length: int) -> RewardFn:
    """Factory: DAPO's soft overlong punishment on the `completion_lengths` column.

    ```
    R_len(y) = 0                              if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -1                             if |y| > L_max
    ```
    with `|y|` the completion's token count. E.g. L_max = 100, L_cache = 20, |y| = 90 ->
    -0.5. Add it to the correctness reward (weights 1, 1). Spec form:
    `"jaxpost.rl.rewards:soft_overlong_penalty(max_completion_length=512, cache_length=128)"`.

    Args:
        max_completion_length: L_max, the generation budget in tokens.
        cache_length: L_cache, the soft-penalty band below L_max (0 gives no soft band).

    Returns:
        A reward function `(prompts, completions, *, completion_lengths, **_) -> list[float]`.

    Raises:
        ValueError: unless `0 <= cache_length <= max_completion_length` and
            `max_completion_length > 0`.
    """
    l_max, cache = int(max_completion_length), int(cache_length)
    if l_max <= 0 or not 0 <= cache <= l_max:
        raise ValueError(f"soft_overlong_penalty needs max_completion_length > 0 and "
                         f"0 <= cache_length <= max_completion_length, got "
                         f"max_completion_length={max_completion_length}, "
                         f"cache_length={cache_length}")
    threshold = l_max - cache

    def soft_overlong_penalty(prompts: Sequence[str], completions: Sequence[str], *,
                              completion_lengths: Sequence[int] | None = None,
                              **_: Any) -> list[float]:
        del prompts
        if completion_lengths is None:
            raise ValueError("soft_overlong_penalty needs the 'completion_lengths' column "
                             "(token counts of the completions), which the GRPO trainer passes")
        if len(completion_lengths) != len(completions):
            raise ValueError(f"{len(completion_lengths)} completion_lengths for "
                             f"{len(completions)} completions")
        out = []
        for n in completion_lengths:
            n = int(n)
            if n <= threshold:
                out.append(0.0)
            elif n <= l_max:
                out.append((threshold - n) / cache)
            else:
                out.append(-1.0)
        return out

    return soft_overlong_penalty

"""A base model against checkpoints: weight change, KL, intruders -> the files in `out`.

`analyze(base, checkpoints, out, options)` is what `python -m jaxpost.analyze` runs. It
reads the base once and each checkpoint in turn (`loading`), and writes:

- `weight_change.csv`: one row per checkpoint x layer x module (`layer` empty outside the
  layer stack) with `abs`, `rel`, `rms` (`weights`), `numel` and `base_norm`;
- `kl.csv`: per checkpoint, the mean and largest token KL to the base on the probe set;
- `intruders.csv`: per checkpoint x layer x 2-D layer matrix x ε, the intruder count and
  energy share of the top-k singular vectors, and the smallest best-|cos|;
- PNGs: `heatmap_rel_<checkpoint>.png` (module x layer, the last checkpoint of each
  series), `trajectory_rel.png` (per-module relative change against step),
  `kl.png`, `intruders.png` (intruder count per module against step);
- `summary.md`: the plots, tables, and the largest changes stated in words.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from jaxpost.analysis import intruders as intr
from jaxpost.analysis import kl as klm
from jaxpost.analysis import loading, report
from jaxpost.analysis.weights import (
    aggregate_rel,
    iter_tensors,
    module_sort_key,
    weight_change,
)

WEIGHT_COLUMNS = ("checkpoint", "series", "step", "layer", "module", "abs", "rel", "rms",
                  "numel", "base_norm")
KL_COLUMNS = ("checkpoint", "series", "step", "kl_mean", "kl_max", "tokens")
INTRUDER_COLUMNS = ("checkpoint", "series", "step", "layer", "module", "side", "k", "eps",
                    "count", "energy_share", "min_max_cos")
_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """What to compute besides the weight change (always computed)."""

    kl: bool = True  # token KL to the base on a probe set
    probe: str = ""  # JSONL of {"text"} / {"prompt"} lines; "" = sample from BOS with the base
    probe_samples: int = 16  # rows sampled from the base when `probe` has no texts
    probe_tokens: int = 48  # tokens sampled per row (continuations of prompts, or from BOS)
    probe_max_len: int = 256  # longer probe rows are cut
    batch_size: int = 8  # probe rows per forward pass
    tokenizer: str = ""  # tokenizer of text probes; "" = the base's (run config or HF folder)
    seed: int = 0  # probe sampling
    intruders: bool = True  # intruder dimensions of the layers' 2-D matrices
    intruder_k: int = 10  # top singular vectors examined
    intruder_eps: tuple[float, ...] = (0.5, 0.6, 0.75)  # thresholds; the first is the headline
    intruder_side: str = "left"  # "left" (output space) or "right"

    def __post_init__(self):
        for name in ("probe_samples", "probe_tokens", "probe_max_len", "batch_size",
                     "intruder_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.intruder_eps or any(not 0 < e <= 1 for e in self.intruder_eps):
            raise ValueError(f"intruder_eps={self.intruder_eps}: thresholds in (0, 1]")
        if self.intruder_side not in intr.SIDES:
            raise ValueError(f"intruder_side={self.intruder_side!r}; expected {intr.SIDES}")


@dataclasses.dataclass
class AnalysisResult:
    """Everything `analyze` measured (the rows of its CSVs) and the files it wrote."""

    weights: list[dict[str, Any]]
    kl: list[dict[str, Any]]
    intruders: list[dict[str, Any]]
    files: list[str]
    refs: list[loading.ModelRef]


def _probe(opts: AnalysisOptions, cfg, params, tokenizer_spec: str | None) -> klm.Probe:
    tokenizer = None
    spec = opts.tokenizer or tokenizer_spec
    if spec:
        from jaxpost.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(spec)
    pad = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    bos = tokenizer.bos_id if tokenizer is not None else cfg.bos_token_id
    texts, prompts = [], []
    if opts.probe:
        records = klm.read_probe_file(opts.probe)
        if tokenizer is None:
            raise ValueError(f"probe {opts.probe}: text probes need a tokenizer; the base "
                             "names none (pass --tokenizer)")
        for rec in records:
            ids = tokenizer.encode(rec.get("text") or rec["prompt"])
            if bos is not None and tokenizer.add_bos and ids[:1] != [bos]:
                ids = [bos] + ids  # unless the text starts with it (a chat template's BOS)
            (texts if rec.get("text") else prompts).append(ids)
    else:
        prompts = [[bos if bos is not None else 0]] * opts.probe_samples
    rows = list(texts)
    if prompts:
        eos = cfg.eos_token_ids or ((tokenizer.eos_id,) if tokenizer is not None
                                    and tokenizer.eos_id is not None else ())
        rows += klm.sample_probe(cfg, params, prompts, max_new_tokens=opts.probe_tokens,
                                 seed=opts.seed, pad_id=pad, eos_ids=tuple(eos),
                                 batch_size=opts.batch_size)
    return klm.probe_from_ids(rows, pad, opts.probe_max_len)


def _intruder_rows(ref, base_mats, bases, params, opts) -> list[dict[str, Any]]:
    out = []
    for t in iter_tensors(params):
        key = (t.layer, t.module)
        if key not in base_mats:
            continue
        if key not in bases:
            bases[key] = intr.singular_basis(base_mats[key], opts.intruder_side)
        res = intr.intruder_dimensions(base_mats[key], t.hf_matrix(), k=opts.intruder_k,
                                       epsilons=opts.intruder_eps, side=opts.intruder_side,
                                       basis=bases[key])
        for eps, count, share in zip(res.epsilons, res.counts, res.energy_share):
            out.append({"checkpoint": ref.label, "series": ref.series, "step": ref.step,
                        "layer": t.layer, "module": t.module, "side": opts.intruder_side,
                        "k": len(res.max_cos), "eps": eps, "count": count,
                        "energy_share": share, "min_max_cos": float(res.max_cos.min())})
    return out


def analyze(base: str, checkpoints: Sequence[str], out: str,
            opts: AnalysisOptions = AnalysisOptions()) -> AnalysisResult:
    """Compares `checkpoints` (specs, see `loading`) with `base` and writes `out`.

    Raises:
      FileNotFoundError / ValueError: a spec does not resolve, the base is a workdir spec
        standing for several steps, a checkpoint is another architecture, or a probe file
        is malformed (each naming what and where).
    """
    if not checkpoints:
        raise ValueError("no checkpoints to analyse (--checkpoints=P1[,P2...])")
    base_refs = loading.resolve(base, "base")
    if len(base_refs) != 1:
        raise ValueError(f"base {base!r} stands for {len(base_refs)} checkpoints; give one "
                         "(DIR or DIR@STEP)")
    refs = [r for spec in checkpoints for r in loading.resolve(spec)]
    os.makedirs(out, exist_ok=True)
    base_cfg, base_params, tokenizer_spec = loading.load(base_refs[0])
    kl_cfg = klm.kl_config(base_cfg)
    probe = _probe(opts, kl_cfg, base_params, tokenizer_spec) if opts.kl else None
    base_mats = {(t.layer, t.module): t.hf_matrix() for t in iter_tensors(base_params)
                 if t.layer is not None and t.is_kernel and t.module in _MATRICES}
    bases: dict = {}
    w_rows, kl_rows, in_rows = [], [], []
    for ref in refs:
        cfg, params, _ = loading.load(ref)
        loading.check_same_architecture(base_cfg, cfg, ref.label)
        for c in weight_change(base_params, params):
            w_rows.append({"checkpoint": ref.label, "series": ref.series, "step": ref.step,
                           **dataclasses.asdict(c)})
        if probe is not None:
            r = klm.probe_kl(kl_cfg, params, base_params, probe, opts.batch_size)
            kl_rows.append({"checkpoint": ref.label, "series": ref.series, "step": ref.step,
                            "kl_mean": r.mean, "kl_max": r.max, "tokens": r.tokens})
        if opts.intruders:
            in_rows += _intruder_rows(ref, base_mats, bases, params, opts)
        del params
    result = AnalysisResult(w_rows, kl_rows, in_rows, [], refs)
    _write(out, base, result, opts)
    return result


# ----------------------------------------------------------------------------- output
def _x(ref: loading.ModelRef, index: int) -> float:
    return float(ref.step) if ref.step is not None else float(index)


def _by_checkpoint(rows, label):
    return [r for r in rows if r["checkpoint"] == label]


def _last_of_series(refs: Sequence[loading.ModelRef]) -> list[loading.ModelRef]:
    last: dict[str, loading.ModelRef] = {}
    for r in refs:
        if r.series not in last or (r.step or 0) >= (last[r.series].step or 0):
            last[r.series] = r
    return list(last.values())


def _changes_of(rows):
    from jaxpost.analysis.weights import Change

    fields = {f.name for f in dataclasses.fields(Change)}
    return [Change(**{k: v for k, v in r.items() if k in fields}) for r in rows]


def _write(out: str, base: str, res: AnalysisResult, opts: AnalysisOptions) -> None:
    files = res.files
    path = os.path.join(out, "weight_change.csv")
    report.write_csv(path, res.weights, WEIGHT_COLUMNS)
    files.append(path)
    if res.kl:
        path = os.path.join(out, "kl.csv")
        report.write_csv(path, res.kl, KL_COLUMNS)
        files.append(path)
    if opts.intruders:
        path = os.path.join(out, "intruders.csv")
        report.write_csv(path, res.intruders, INTRUDER_COLUMNS)
        files.append(path)

    plots: list[tuple[str, str]] = []  # (caption, file name)
    for ref in _last_of_series(res.refs):
        name = f"heatmap_rel_{report.file_stem(ref.label)}.png"
        if report.heatmap(os.path.join(out, name), _by_checkpoint(res.weights, ref.label),
                          "rel", f"relative weight change ‖W−W₀‖/‖W₀‖: {ref.label}"):
            plots.append((f"Relative change per module and layer, {ref.label}", name))

    index = {r.label: i for i, r in enumerate(res.refs)}
    series: dict[str, dict[str, list]] = {}
    for ref in res.refs:
        agg = aggregate_rel(_changes_of(_by_checkpoint(res.weights, ref.label)))
        for module, value in agg.items():
            series.setdefault(ref.series, {}).setdefault(module, []).append(
                (_x(ref, index[ref.label]), value))
    if series:
        name = "trajectory_rel.png"
        report.line_panels(os.path.join(out, name), series, "relative change",
                           "per-module relative change over the layer stack, by checkpoint")
        plots.append(("Relative change of each module type across checkpoints", name))
    if res.kl:
        kl_series = {}
        for ref, row in zip(res.refs, res.kl):
            kl_series.setdefault("KL to base", {}).setdefault(ref.series, []).append(
                (_x(ref, index[ref.label]), row["kl_mean"]))
        name = "kl.png"
        report.line_panels(os.path.join(out, name), kl_series, "mean token KL (nats)",
                           "token-level KL(checkpoint ‖ base) on the probe set")
        plots.append(("Token KL to the base across checkpoints", name))
    eps0 = opts.intruder_eps[0]
    if res.intruders:
        in_series: dict[str, dict[str, list]] = {}
        for ref in res.refs:
            counts: dict[str, int] = {}
            for r in _by_checkpoint(res.intruders, ref.label):
                if r["eps"] == eps0:
                    counts[r["module"]] = counts.get(r["module"], 0) + r["count"]
            for module, n in counts.items():
                in_series.setdefault(ref.series, {}).setdefault(module, []).append(
                    (_x(ref, index[ref.label]), float(n)))
        name = "intruders.png"
        report.line_panels(os.path.join(out, name), in_series, f"intruders (ε={eps0:g})",
                           f"intruder dimensions per module (top-{opts.intruder_k}, summed "
                           "over layers)")
        plots.append((f"Intruder dimensions (ε = {eps0:g}) across checkpoints", name))
    files += [os.path.join(out, f) for _, f in plots]
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write(summary_markdown(base, res, opts, plots))
    files.append(path)


def _g(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _layer_text(rows) -> str:
    layers = sorted(r["layer"] for r in rows)
    return ", ".join(str(x) for x in layers)


def describe_checkpoint(label: str, rows: Sequence[dict[str, Any]]) -> str:
    """The largest changes of one checkpoint in words (module types, tensors, layers)."""
    changes = _changes_of(rows)
    agg = aggregate_rel(changes)
    if not agg:
        return f"- **{label}**: no layer tensors."
    ranked = sorted(agg, key=lambda m: -(agg[m] if not math.isnan(agg[m]) else -1))
    if all(agg[m] == 0 for m in ranked):
        return f"- **{label}**: identical to the base (every change is 0)."
    top = ", ".join(f"{m} ({_g(agg[m])})" for m in ranked[:3])
    least = ", ".join(f"{m} ({_g(agg[m])})" for m in ranked[-2:])
    layer_rows = [r for r in rows if r["layer"] is not None and not math.isnan(r["rel"])]
    biggest = max(layer_rows, key=lambda r: r["rel"])
    mlp = [r for r in layer_rows if r["module"] in ("gate_proj", "up_proj", "down_proj")]
    parts = [f"- **{label}**: the module types that moved most (relative change over the "
             f"layer stack) are {top}; least: {least}. The largest single change is layer "
             f"{biggest['layer']} {biggest['module']} (rel {_g(biggest['rel'])}, rms "
             f"{_g(biggest['rms'])})."]
    if mlp:
        per_layer: dict[int, float] = {}
        for r in mlp:
            per_layer[r["layer"]] = per_layer.get(r["layer"], 0.0) + r["rel"]
        order = sorted(per_layer, key=lambda x: -per_layer[x])
        frozen = [x for x in per_layer if per_layer[x] == 0]
        text = f" Its MLPs moved most in layer(s) {', '.join(map(str, order[:2]))}"
        if frozen:
            text += f"; the MLPs of layer(s) {', '.join(map(str, sorted(frozen)))} did not move"
        parts.append(text + ".")
    outside = [r for r in rows if r["layer"] is None]
    if outside:
        parts.append(" Outside the layer stack: " + ", ".join(
            f"{r['module']} {_g(r['rel'])}" for r in sorted(
                outside, key=lambda r: module_sort_key(r["module"]))) + ".")
    return "".join(parts)


def summary_markdown(base: str, res: AnalysisResult, opts: AnalysisOptions,
                     plots: Sequence[tuple[str, str]]) -> str:
    """summary.md: what was compared, the largest changes in words, tables, plots."""
    lines = ["# What training changed", "",
             f"Base: `{base}`. Checkpoints: " + ", ".join(f"`{r.label}`" for r in res.refs)
             + ".", "",
             "Weight change per tensor: `abs` = ‖W−W₀‖_F, `rel` = abs/‖W₀‖_F, `rms` = "
             "abs/√numel (`weight_change.csv`); module types below aggregate the layer stack "
             "as √Σabs² / √Σ‖W₀‖².", "", "## Largest changes", ""]
    lines += [describe_checkpoint(r.label, _by_checkpoint(res.weights, r.label))
              for r in res.refs]
    modules = sorted({r["module"] for r in res.weights if r["layer"] is not None},
                     key=module_sort_key)
    lines += ["", "## Relative change per module type", "",
              "| checkpoint | " + " | ".join(modules) + " |",
              "|---|" + "---|" * len(modules)]
    for ref in res.refs:
        agg = aggregate_rel(_changes_of(_by_checkpoint(res.weights, ref.label)))
        lines.append(f"| {ref.label} | " + " | ".join(_g(agg.get(m, math.nan))
                                                      for m in modules) + " |")
    if res.kl:
        lines += ["", "## Token KL to the base", "",
                  f"Exact full-vocabulary KL(checkpoint ‖ base) per token, on "
                  f"{res.kl[0]['tokens']} probe tokens ("
                  + (f"`{opts.probe}`" if opts.probe else
                     f"{opts.probe_samples} rows of {opts.probe_tokens} tokens sampled from "
                     "the base") + ").", "",
                  "| checkpoint | mean KL | max KL |", "|---|---|---|"]
        lines += [f"| {r['checkpoint']} | {_g(r['kl_mean'])} | {_g(r['kl_max'])} |"
                  for r in res.kl]
        top = max(res.kl, key=lambda r: r["kl_mean"])
        lines += ["", f"The largest mean KL is {_g(top['kl_mean'])} nats/token "
                  f"({top['checkpoint']})."]
    if opts.intruders:
        eps0 = opts.intruder_eps[0]
        lines += ["", "## Intruder dimensions", "",
                  f"Top-{opts.intruder_k} {opts.intruder_side} singular vectors of each layer "
                  f"matrix whose best |cos| to every base singular vector is below ε "
                  f"(`intruders.csv`; counts summed over layers).", "",
                  "| checkpoint | " + " | ".join(f"ε={e:g}" for e in opts.intruder_eps) + " |",
                  "|---|" + "---|" * len(opts.intruder_eps)]
        for ref in res.refs:
            rows = _by_checkpoint(res.intruders, ref.label)
            lines.append(f"| {ref.label} | " + " | ".join(
                str(sum(r["count"] for r in rows if r["eps"] == e))
                for e in opts.intruder_eps) + " |")
        final = [r for r in res.intruders if r["eps"] == eps0
                 and r["checkpoint"] == res.refs[-1].label and r["count"] > 0]
        if final:
            per: dict[str, int] = {}
            for r in final:
                per[r["module"]] = per.get(r["module"], 0) + r["count"]
            lines += ["", f"At ε = {eps0:g}, {res.refs[-1].label} has intruders in: "
                      + ", ".join(f"{m} ({n})" for m, n in sorted(
                          per.items(), key=lambda kv: -kv[1])) + "."]
    if plots:
        lines += ["", "## Plots", ""]
        for caption, name in plots:
            lines += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    return "\n".join(lines).rstrip() + "\n"


__all__ = [
    "INTRUDER_COLUMNS",
    "KL_COLUMNS",
    "WEIGHT_COLUMNS",
    "AnalysisOptions",
    "AnalysisResult",
    "analyze",
    "describe_checkpoint",
    "summary_markdown",
]


"""What did training change? Weight change per (layer, module), token KL to the base,
intruder dimensions, and their plots (ALGORITHMS.md §3, §5.1).

    from jaxpost import analysis
    analysis.analyze("base_hf_folder", ["workdir@all"], "out/")   # CSVs, PNGs, summary.md

or `python -m jaxpost.analyze --base=PATH --checkpoints=P1[,P2...] --out=DIR`. The pieces
are usable alone: `weight_change(base_params, params)`, `intruder_dimensions(W0, W)`,
`probe_kl(cfg, params, base_params, probe)`.
"""

from jaxpost.analysis.compare import AnalysisOptions, AnalysisResult, analyze
from jaxpost.analysis.intruders import IntruderResult, intruder_dimensions, max_cosines
from jaxpost.analysis.kl import KLResult, Probe, probe_from_ids, probe_kl, sample_probe
from jaxpost.analysis.loading import ModelRef, load, resolve
from jaxpost.analysis.weights import Change, aggregate_rel, iter_tensors, weight_change

__all__ = ["AnalysisOptions", "AnalysisResult", "Change", "IntruderResult", "KLResult",
           "ModelRef", "Probe", "aggregate_rel", "analyze", "intruder_dimensions",
           "iter_tensors", "load", "max_cosines", "probe_from_ids", "probe_kl", "resolve",
           "sample_probe", "weight_change"]

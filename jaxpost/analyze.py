"""`python -m jaxpost.analyze --base=PATH --checkpoints=P1[,P2...] --out=DIR`: what did
training change?

PATH and each P are a Hugging Face folder or a jaxpost workdir (`DIR`: latest step,
`DIR@STEP`, `DIR@all`: every step). Writes `DIR/weight_change.csv` (`checkpoint, series,
step, layer, module, abs, rel, rms, numel, base_norm`; one row per layer x module, `layer`
empty outside the layer stack), `kl.csv`, `intruders.csv`, PNG heatmaps and line plots,
and `summary.md` (see `jaxpost.analysis.compare`). Errors exit with status 2 and one line.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from absl import logging as absl_logging

from jaxpost.analysis.compare import AnalysisOptions, analyze

_BASE = flags.DEFINE_string("base", None, "The base model: an HF folder or a workdir[@STEP].")
_CHECKPOINTS = flags.DEFINE_list(
    "checkpoints", None, "Comma-separated: HF folders or workdirs (DIR, DIR@STEP, DIR@all).")
_OUT = flags.DEFINE_string("out", None, "Folder to write the CSVs, plots and summary.md to.")
_KL = flags.DEFINE_bool("kl", True, "Token KL of each checkpoint to the base on the probe set.")
_PROBE = flags.DEFINE_string(
    "probe", "", "JSONL probe set: {\"text\": ...} lines used as they are, {\"prompt\": ...} "
    "lines continued by the base; empty: rows sampled from BOS by the base.")
_PROBE_SAMPLES = flags.DEFINE_integer("probe_samples", 16, "Rows sampled when no probe file.")
_PROBE_TOKENS = flags.DEFINE_integer("probe_tokens", 48, "Tokens the base samples per row.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Probe rows per forward pass.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "Tokenizer for text probes (default: the base run's, or the HF folder's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampled probe set.")
_INTRUDERS = flags.DEFINE_bool("intruders", True, "Intruder dimensions of the layer matrices.")
_K = flags.DEFINE_integer("intruder_k", 10, "Top singular vectors examined per matrix.")
_EPS = flags.DEFINE_list("intruder_eps", ["0.5", "0.6", "0.75"],
                         "Thresholds on the best |cos| (the first is the headline).")
_SIDE = flags.DEFINE_enum("intruder_side", "left", ["left", "right"],
                          "Left (output-space) or right singular vectors.")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not _BASE.value or not _CHECKPOINTS.value or not _OUT.value:
        raise app.UsageError("--base, --checkpoints and --out are required", exitcode=2)
    try:
        try:
            eps = tuple(float(e) for e in _EPS.value)
        except ValueError:
            raise ValueError(f"--intruder_eps={','.join(_EPS.value)}: not numbers") from None
        opts = AnalysisOptions(
            kl=_KL.value, probe=_PROBE.value, probe_samples=_PROBE_SAMPLES.value,
            probe_tokens=_PROBE_TOKENS.value, batch_size=_BATCH.value,
            tokenizer=_TOKENIZER.value, seed=_SEED.value, intruders=_INTRUDERS.value,
            intruder_k=_K.value, intruder_eps=eps, intruder_side=_SIDE.value)
        result = analyze(_BASE.value, _CHECKPOINTS.value, _OUT.value, opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"checkpoints": [r.label for r in result.refs], "files": result.files}))


if __name__ == "__main__":
    app.run(main)

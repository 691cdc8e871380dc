"""`python -m jaxpost.fisher --config=configs/NAME.py --config.workdir=DIR [--config.a.b=V]`.

Runs only the Fisher step of an SFT recipe: the base model's Fisher on the recipe's
`fisher.source` alignment data (kind `fisher.kind`), written to `fisher.path` (default
`DIR/fisher`) with its fingerprint. A later `python -m jaxpost.train` with the same
recipe and workdir reuses it; one made for another model or data is refused (exit 2).
"""

from __future__ import annotations

import logging
import sys

from absl import app

from jaxpost.train.__main__ import _CONFIG, _fail, load_config, parse_flags


def main(argv):
    del argv
    logging.getLogger("jaxpost").setLevel(logging.INFO)
    if _CONFIG.value is None:
        _fail("--config=configs/NAME.py is required")
    from jaxpost.config import ConfigError
    try:
        cfg, _ = load_config(_CONFIG.value)
    except ConfigError as e:
        _fail(str(e))
    if cfg.trainer != "sft" or not hasattr(cfg, "fisher"):
        _fail(f"config.trainer={cfg.trainer!r}: the Fisher step belongs to SFT recipes")
    if not cfg.workdir and not cfg.fisher.path:
        _fail("pass --config.workdir=DIR (the Fisher goes to DIR/fisher) or "
              "--config.fisher.path=PATH")
    if not cfg.fisher.source:
        _fail("config.fisher.source is empty: name the alignment data (SFT records)")

    from jaxpost.models import param_logical_axes
    from jaxpost.peft.fisher import FisherMismatchError
    from jaxpost.train.common import model_init, plan_params, setup
    from jaxpost.train.regularise import ensure_fisher

    tokenizer, mesh, model_cfg = setup(cfg.model, cfg.mesh, cfg.data.tokenizer)
    plan = plan_params(cfg, model_cfg, *model_init(cfg.model, model_cfg, mesh, cfg.seed),
                       param_logical_axes(model_cfg), mesh)
    try:
        fisher = ensure_fisher(cfg, plan, model_cfg, tokenizer)
    except (FisherMismatchError, ValueError) as e:
        _fail(str(e))
    print(f"fisher: {fisher.kind}, {fisher.num_examples} examples, "
          f"{cfg.fisher.path or cfg.workdir + '/fisher'}")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=parse_flags))

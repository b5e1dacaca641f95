"""Serve a run over HTTP: `python -m flan_squad.serve run_dir=... [port=8000]` (docs/serving.md).

Answers through the answering path of `flan_squad.predict` (`flan_squad.runs.answering`: the run's context windows,
best-window choice, snapping and no-answer threshold), so the same inputs get the same answers; concurrent requests
are answered in batches (`flan_squad.runs.serving`). Bound to 127.0.0.1 unless `host=` says otherwise; SIGTERM or
Ctrl-C stops it once the requests in flight are answered.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from flan_squad.runs.answering import Answerer
from flan_squad.utils.config import register_resolvers
from flan_squad.utils.errors import ConfigError, exit_on_error


def check_options(cfg: DictConfig) -> None:
    """The server's own options, each a whole number in its range (one line naming the option otherwise)."""
    ranges = {"port": (0, 65535), "max_batch": (1, 4096), "max_context_chars": (1, 10_000_000),
              "max_question_chars": (1, 100_000), "max_wait_ms": (0, 10_000)}
    for option, (low, high) in ranges.items():
        value = cfg[option]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(f"{option}={value}: expected a number from {low} to {high}")


register_resolvers()  # conf/ uses them; Hydra resolves the config inside main


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        check_options(cfg)
        try:
            import uvicorn

            from flan_squad.runs.serving import make_app
        except ImportError as e:
            raise ConfigError(
                f"serving needs FastAPI and uvicorn ({e.name} is missing): pip install -e '.[serve]'") from None
        answerer = Answerer.from_config(cfg)
    app = make_app(answerer, cfg.max_batch, cfg.max_wait_ms, cfg.max_context_chars, cfg.max_question_chars)
    about = answerer.describe()
    print(f"flan-squad serve: {about['model']} (SQuAD {about['squad_version']}, {about['precision']} on "
          f"{about['device']}) at http://{cfg.host}:{cfg.port}/answer; API schema at /docs and /openapi.json"
          + (f"\n  NOTE {about['note']}" if about["note"] else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, access_log=False, log_level="info")


if __name__ == "__main__":
    main()

"""Fine-tune a FLAN-T5 model on SQuAD: `python -m flan_squad.train strategy=qlora dataset=squad_v2`.

Instantiates what the config describes, fits, validates the best checkpoint, and writes the run's
artefacts into its Hydra run dir: `metrics.json`, `predictions.json`, `config.yaml`, `model/`,
`checkpoints/` and `tensorboard/`.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the dataloader may fork after tokenizing

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from flan_squad import config  # noqa: E402,F401  (registers the resolvers conf/ uses)
from flan_squad.jobs import uses_batch_size_finder  # noqa: E402
from flan_squad.model import SquadQAModule  # noqa: E402
from flan_squad.results import CostMonitor, summary, write_json_atomic  # noqa: E402

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)

    base = instantiate(cfg.model, _convert_="all")
    tokenizer = base.load_tokenizer()
    datamodule = instantiate(cfg.dataset, tokenizer=tokenizer, seed=cfg.seed)
    strategy = instantiate(cfg.strategy, _convert_="all")
    module = SquadQAModule(base, strategy, tokenizer, datamodule.version, cfg.eval.max_new_tokens,
                           cfg.optim.weight_decay, cfg.optim.warmup_ratio)
    cost = CostMonitor()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [cost]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(module, datamodule=datamodule)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)

    if trainer.is_global_zero:
        strategy.save(module.model, tokenizer, output_dir / "model")
    metrics = {
        **module.scores,
        "strategy": strategy.name,
        "model": base.name,
        "init": base.init,
        "dataset": datamodule.name,
        "squad_version": datamodule.version,
        **module.parameter_counts(),
        **cost.as_dict(),
        "train_examples": len(datamodule.train_questions),
        "val_examples": len(datamodule.val_questions),
        "epochs": trainer.current_epoch,
        "optimizer_steps": trainer.global_step,
        "batch_size": datamodule.batch_size,
        "auto_batch_size": uses_batch_size_finder(trainer),  # then batch_size is the size the finder chose
        "lr": strategy.lr,
        "seed": cfg.seed,
        "precision": str(trainer.precision),
        "device": str(trainer.strategy.root_device),
        **datamodule.stats,
        "best_checkpoint": os.path.relpath(best, output_dir) if best else None,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "predictions.json", module.predictions)
        write_json_atomic(output_dir / "metrics.json", metrics)
        print(summary(metrics, output_dir), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)["f1"]  # what a sweeper maximises


if __name__ == "__main__":
    main()

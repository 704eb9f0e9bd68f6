"""The training system, one subpackage per stage (map and one sample's route: docs/architecture.md).

    config.py   the one typed config (every section, presets as data, validation); imports nothing of ours
    cli/        for the launchers: --help from the dataclasses, checks before training (model, S3, resources)
    data/       manifest-driven loader, augmentation, S3 opener: shards -> batches
    finetune/   where initial weights come from (exports, checkpoints, timm files) and the fine-tuning data
    train/      Ray Train + DeepSpeed: the run loop, AGC, SGD, SAM, EMA, evaluation, checkpoints, export
    sweep/      scaling sweeps: the SPEC and the runner (Ray tasks of the same trainer)
    scaling/    fits and reports from a results table; no torch training code

Direction (an arrow: "may import"): train -> data, finetune; sweep -> train, finetune, scaling;
everything -> config. Each subpackage's MAY_IMPORT lists exactly what it may import of this
repository; tests/test_architecture.py checks every import (function-level ones too) against it and
fails on any import cycle.
"""

# Modules directly in pipeline/ (config.py) import nothing else of ours.
MAY_IMPORT: tuple[str, ...] = ()

"""What the launchers need beyond the config: `--help` generated from the config dataclasses
(help.py) and the checks run before training, with one-line errors (preflight.py): the model name,
S3 reachability and credentials, the warm-up against the run's length, the cluster's resources.
Checks that need only the config (ranges, exclusive choices) are pipeline.config.validate's."""

MAY_IMPORT: tuple[str, ...] = ("models", "data_prep", "pipeline.config")

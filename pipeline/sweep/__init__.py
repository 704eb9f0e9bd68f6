"""Scaling sweeps: spec.py (the SPEC file: models x budgets x lr x seeds, typed) and runner.py (every
point a Ray task of the same trainer, the results table, fine-tuning of selected runs, the fit).
"""

MAY_IMPORT = ("data_prep", "models", "pipeline.config", "pipeline.finetune", "pipeline.scaling", "pipeline.train.ray_job")

"""Fine-tuning is a config of the one trainer; this package holds what that config points at:
sources.py reads `model.init_from` (a pretraining export, a Ray Train checkpoint, timm or converted
weights; local or s3://) and builds the initial model; prepare.py packs `data.source` and checks
splits and classes in the driver before any worker starts. The trainer imports sources.py; nothing
here imports the trainer.
"""

MAY_IMPORT = ("data_prep", "models", "pipeline.config", "pipeline.formats")

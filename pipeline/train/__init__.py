"""Ray Train + DeepSpeed data-parallel training: ray_job.py starts the TorchTrainer; in every worker
run.py (TrainRun) builds the model, engine and loaders and runs the loop from step.py's pieces (lr,
loss, AGC at the accumulation boundary in agc.py, SGD in optim.py, SAM in sam.py, EMA), evaluates
(evaluate.py) and writes checkpoints and the export (checkpoint.py: the formats).
"""

MAY_IMPORT = ("data_prep.manifest", "data_prep.storage", "models", "pipeline.config", "pipeline.data",
              "pipeline.finetune.sources", "pipeline.formats")

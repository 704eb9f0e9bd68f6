"""Shards -> batches: the manifest-driven streaming loader (loader.py), the NFNet augmentation recipe
(augment.py) and the s3:// opener (s3io.py). Reads data_prep's manifest; never imports the trainer,
so a loader can be benchmarked or tested without DeepSpeed or Ray.
"""

MAY_IMPORT = ("data_prep.manifest", "data_prep.storage", "pipeline.config")

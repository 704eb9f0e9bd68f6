"""File formats that more than one stage reads: safetensors streamed and read by byte range
(safetensors_io.py) and the sharded checkpoint (sharded.py: what a checkpoint directory holds, its
completeness check and its reader). The trainer writes checkpoints; fine-tuning reads them as
`model.init_from`. Pure format code: no training, no storage clients (callers pass file openers).
"""

MAY_IMPORT: tuple[str, ...] = ()
NEVER_IMPORT = ("deepspeed", "ray")  # formats, not training: callers hand in file openers

"""Pack image corpora into verified webdataset shards (`python -m data_prep`). The bottom layer: the
manifest it writes is what everything above reads, and it imports nothing else of ours (nor torch:
packing processes start without paying for it).
"""

MAY_IMPORT: tuple[str, ...] = ()
NEVER_IMPORT = ("torch", "webdataset", "deepspeed")

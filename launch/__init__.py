"""Ray job entry points (`python launch/pretrain_f7.py ...`). Thin: parse, resolve the config, call the
stage. The top layer: may import any part, and nothing imports it."""

MAY_IMPORT = ("data_prep", "models", "pipeline")

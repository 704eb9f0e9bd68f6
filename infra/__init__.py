"""Cluster configs (YAML, Dockerfile) and the one-machine multi-host helper (netns.py), which starts its
processes by command line and imports nothing of ours."""

MAY_IMPORT: tuple[str, ...] = ()

"""Cluster configs (YAML, Dockerfile) and the one-machine multi-host helper (netns.py)."""

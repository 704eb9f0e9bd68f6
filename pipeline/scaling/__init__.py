"""Scaling laws from a sweep's results table: `python -m pipeline.scaling fit RESULTS`."""

from .analysis import analyze, cells
from .fit import fit_table
from .laws import Cell, OptimalFit, PowerFit, Refusal, compute_optimal, fit_power, frontier

__all__ = ["analyze", "cells", "fit_table", "Cell", "OptimalFit", "PowerFit", "Refusal", "compute_optimal", "fit_power", "frontier"]

"""Scaling laws from a sweep's results table: `python -m pipeline.scaling fit RESULTS`.

Reads the table (table.py), fits the laws (laws.py, analysis.py) and writes the report (report.py).
Never imports torch training code, models or the trainer: a table from any source can be fitted.
"""

MAY_IMPORT = ("data_prep.storage",)
NEVER_IMPORT = ("deepspeed", "ray", "torch.nn", "torch.distributed")


from .analysis import analyze, cells
from .fit import fit_table
from .laws import Cell, OptimalFit, PowerFit, Refusal, budget_key, compute_optimal, fit_power, frontier
from .surface import SurfaceFit, fit_cells, fit_surface

__all__ = ["analyze", "cells", "fit_table", "Cell", "OptimalFit", "PowerFit", "Refusal", "budget_key", "compute_optimal", "fit_power",
           "frontier", "SurfaceFit", "fit_cells", "fit_surface"]

"""Reports: charts and pages drawn from results, captures or executions; drift; `ics show`."""

from .build import check_out, collect, render
from .drift import Drift, compare, psi
from .rows import ReportRow, RowStream, open_rows
from .stats import Stats

__all__ = [
    "Drift",
    "ReportRow",
    "RowStream",
    "Stats",
    "check_out",
    "collect",
    "compare",
    "open_rows",
    "psi",
    "render",
]

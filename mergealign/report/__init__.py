"""The study report: report.md + report.html (self-contained) + PNG plots, from a results folder.

Modules: results (the results folder: its layout, reading and writing it), tables (a model's figures, the main
table, contribution rows), plots (matplotlib plots, the Pareto front), render (the documents, `build_report`).
"""

from mergealign.report.plots import pareto_front
from mergealign.report.render import Report, build_report
from mergealign.report.results import ModelFiles, ModelResult, RunResults, load_results, write_results
from mergealign.report.tables import (
    Table,
    contribution_rows,
    main_table,
    primary_judge,
    safety_cells,
    safety_score,
)

__all__: list[str] = [
    "ModelFiles",
    "ModelResult",
    "Report",
    "RunResults",
    "Table",
    "build_report",
    "contribution_rows",
    "load_results",
    "main_table",
    "pareto_front",
    "primary_judge",
    "safety_cells",
    "safety_score",
    "write_results",
]

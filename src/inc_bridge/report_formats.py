"""The files a report can be written as; a recipe's ``report.formats`` names them.

In a module of its own, below the recipe that lists them and the report that writes them.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ALL_REPORT_FORMATS", "ReportFormat"]


class ReportFormat(str, Enum):
    """What ``Report.save`` writes: ``report.json``, ``report.md``, ``report.html`` (self-contained,
    plots embedded) and ``plots``, the ``<stem>.svg`` files (``report.md`` links them)."""

    JSON = "json"
    MD = "md"
    HTML = "html"
    PLOTS = "plots"


ALL_REPORT_FORMATS = tuple(ReportFormat)

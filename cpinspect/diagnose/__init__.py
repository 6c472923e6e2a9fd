"""``cpinspect diagnose``: error text, the scene built from the batch, audits, hypotheses and the
report (data only; the view is :mod:`cpinspect.views.diagnose`)::

    from cpinspect.diagnose import diagnose_batch, DiagnoseReport, EXTRA_CHECKS
    from cpinspect.views.diagnose import render_report
"""

from cpinspect.diagnose.api import EXTRA_CHECKS, DiagnoseReport, diagnose_batch

__all__ = ["EXTRA_CHECKS", "DiagnoseReport", "diagnose_batch"]

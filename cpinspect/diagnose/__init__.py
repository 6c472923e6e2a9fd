"""``cpinspect diagnose``: error text, the scene built from the batch, audits, hypotheses and the
report (data only; the view is :mod:`cpinspect.views.diagnose`).
"""

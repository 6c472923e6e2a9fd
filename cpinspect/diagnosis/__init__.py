"""The parts of ``cpinspect diagnose``; the public API is :mod:`cpinspect.diagnose`.

``scene`` builds what a diagnosis compares against (form, full row, simulation, vision spans),
``audits`` reports what the batch itself shows, ``hypotheses`` tests predicted counts against an
error's numbers, ``spans`` aligns placeholder runs with grids, ``report`` holds the findings.
"""

"""``cpinspect check``: load the user's function, generate cases, run and judge them, probe rank
uniformity, shrink failures, and the report (data only).
"""

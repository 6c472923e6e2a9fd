"""Process groups that run one function on N ranks: the simulated group (threads, ``simulated``)
and gloo (processes, ``gloo`` with its ``watchdog``), both meeting in one ``coordinator`` that
fingerprints every collective, and ``callsite``, the one user-frame finder every report uses.
"""

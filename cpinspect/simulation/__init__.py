"""One simulated run: each rank's program through a group, checked against the oracle, plus the
``--positions`` and ``--vision-dp`` extensions and the ``--explain`` narrative (data only).
"""

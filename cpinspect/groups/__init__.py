"""Process groups that run one function on N ranks: the simulated group (threads) and gloo
(processes), with the collective fingerprints and the user-frame finder they share.
"""

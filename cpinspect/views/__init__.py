"""Every rich rendering, one module per view; rendering never computes findings.
"""

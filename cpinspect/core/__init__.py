"""Values and maths of the pipeline: the batch and its loader, tokens, layouts, vision items, the
selection, the oracle, findings, balance and synthetic batches. Imports no other cpinspect package,
nor rich or typer.
"""

"""One module per extra subcommand; each defines ``register(app)`` and imports torch lazily.

Shared CLI plumbing (``guarded``, ``make_console``, ``load_cli_batch``, option types, exit codes)
lives in :mod:`cpinspect.cli`; import it inside ``register`` or at module level.
"""

"""The command line: :mod:`cpinspect.cli.app` lists the commands, one module each."""

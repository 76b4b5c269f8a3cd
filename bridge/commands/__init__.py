"""Operator subcommands of ``eimis-bridge``, one module per subject.

Each module has ``register(sub)``, which adds its subparsers and sets ``handler`` on them: a
function of the parsed arguments that returns the exit status.
"""

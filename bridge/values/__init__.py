"""Leaf modules: values and the pure rules over them (no I/O), imported from every layer.

A module here imports no other bridge package (the import contracts in ``pyproject.toml`` keep
it so): storage (``bridge/db``) and the Matrix side (``bridge/matrix``) use these values without
reaching up into ``bridge/core`` or ``bridge/appservice``.

- ``trust``: the trust list (server names, the ``m.room.server_acl`` it makes).
- ``permissions``: per-person invitation permissions (allow-all / block-all and exceptions).
- ``crypto_extensions``: the device items an appservice transaction carries (MSC2409/MSC3202).
"""

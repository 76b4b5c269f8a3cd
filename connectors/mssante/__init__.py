"""MSSanté (secure health e-mail) connector: the protocol and message layer.

One module per idea, none importing ``bridge``: ``tokens`` (Pro Santé Connect access tokens,
cached in memory only), ``xoauth2`` (the SASL XOAUTH2 string and its error challenge),
``tlsconfig`` (the TLS context: a CA bundle path only, TLS >= 1.2), ``smtp`` (sending through
``aiosmtplib``: XOAUTH2 without initial response, SIZE, DSN parameters), ``imap`` (reading
through ``aioimaplib``: XOAUTH2 without initial response, UID cursor, IDLE or polling),
``mime`` (building and parsing mail with the standard ``email`` package), ``receipts`` (DSN and
MDN), ``xdm`` (the ``IHE_XDM.zip`` package, read safely). ``connector.MssanteConnector`` assembles
them; it is the ``mssante`` entry point of the ``eimis_bridge.connectors`` group (pyproject.toml).
"""

from connectors.mssante.connector import MssanteConnector

__all__ = ["MssanteConnector"]

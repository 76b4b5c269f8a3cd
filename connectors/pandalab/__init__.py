"""PandaLab-style vendor connector: OAuth2 REST API out, signed webhooks in."""

from connectors.pandalab.connector import PandaLabConnector

__all__ = ["PandaLabConnector"]

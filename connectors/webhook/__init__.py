"""Generic webhook connector: a vendor implements the HTTP contract of openapi.yaml, no Python."""

from connectors.webhook.connector import WebhookConnector

__all__ = ["WebhookConnector"]

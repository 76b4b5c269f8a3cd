"""Medipeps-style vendor connector: API-key REST API out, a polled event feed in."""

from connectors.medipeps.connector import MedipepsConnector

__all__ = ["MedipepsConnector"]

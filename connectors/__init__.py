"""Vendor connectors: one package per vendor, each implementing connectors.base.Connector."""

"""Identities of health professionals: the national identifier and, later, the directory."""

"""Credential Broker: keeps OAuth integrations encrypted and hands out fresh access tokens."""

__version__ = "0.1.0"

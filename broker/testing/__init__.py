"""Test doubles shipped with the broker (used by its tests and by ``broker bench``)."""

"""What the tests share, a module per thing. Fixtures shared across modules are in
tests/conftest.py (pytest finds them there); these are plain functions and classes."""

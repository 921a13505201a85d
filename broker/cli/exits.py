"""The ``broker`` command's exit codes: one table, shown in ``broker --help`` and the docs."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DATABASE = 3
EXIT_INTERRUPTED = 130

EXIT_CODES = """exit codes:
  0    success
  1    a check, a health probe or an operation failed
  2    configuration or usage error: the config file, a BROKER_* variable, a setting, the
       keys, a flag (the one-line message names it, and suggests the name you may have meant)
  3    the database cannot be used: unreachable, refusing connections, no such database
       or role (the message names host, port, database, role and the cause)
  130  interrupted (Ctrl-C)"""


class CommandFailed(Exception):
    """A command's one-line failure: printed as ``broker: <message>`` on stderr, exits ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class UsageError(CommandFailed):
    """Flags that do not fit together (exit 2, like argparse's own usage errors)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_CONFIG)

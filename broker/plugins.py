"""Commands that other distributions add to ``broker``: the dev tools (``broker bench``,
``broker dev-provider``, ``broker serve --dev --demo-provider``) live in their own distribution
(``devtools/``), so the server package never imports them and a production install has none.

They are found through the entry point group ``credential_broker.cli``. Each entry point names
a function ``register(subparsers, serve)`` that adds its subcommands to ``subparsers`` and may
add options to the ``serve`` parser. An option that changes a dev broker's settings appends a
``DevAddition`` to ``args.dev_additions``; ``serve`` applies it only with ``--dev``.
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points
from typing import Protocol

from broker.config import Settings

GROUP = "credential_broker.cli"


class DevAddition(Protocol):
    """Something ``serve --dev`` adds to its settings, e.g. the demo provider."""

    # The option that asked for it, for messages such as "--demo-provider: only with --dev".
    option: str

    def apply(self, settings: Settings) -> Settings:
        """The settings with the addition; called at start-up and on every reload."""
        ...

    def banner(self) -> str:
        """What to print once the dev broker is ready."""
        ...


def register_all(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    serve: argparse.ArgumentParser,
) -> None:
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        entry.load()(subparsers, serve)

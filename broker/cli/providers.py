"""``broker providers list|show``: what the broker knows about each provider (the built-in
catalog and the configured ones) and what the configuration still has to give.

Reads the configuration and the environment only (no database, no provider is called). A
configured provider whose section is wrong shows its problem instead of failing the command.
Nothing printed carries a secret: a client secret is shown only as set or not.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from broker.cli import common, output
from broker.cli.exits import EXIT_OK, UsageError
from broker.config import ProviderSettings
from broker.errors import ConfigError
from broker.providers.catalog import ALIASES, BUILTINS, merge_settings
from broker.providers.profile import AUTHORIZATION_CODE, ProviderProfile


def _entries(args: argparse.Namespace) -> list[dict[str, Any]]:
    configured: dict[str, tuple[str, ProviderSettings]] = {
        ALIASES.get(key, key): (key, section)
        for key, section in common.settings(args).providers.items()
    }
    names = sorted(set(BUILTINS) | set(configured))
    return [_describe(name, configured.get(name)) for name in names]


def _describe(name: str, section: tuple[str, ProviderSettings] | None) -> dict[str, Any]:
    builtin = BUILTINS.get(name)
    profile = builtin
    problem = None
    if section is not None:
        key, settings = section
        try:
            profile = merge_settings(key, settings, os.environ)
        except ConfigError as exc:
            problem = str(exc)
    if profile is None:  # a custom provider whose section is wrong
        profile = ProviderProfile(name=name)
    needs = list(profile.missing_settings()) if problem is None else []
    templates = [
        f"{template} (template_values.{template} or each integration's metadata.{template})"
        for template in profile.unfilled_templates
    ]
    if section is None:
        status = "not configured"
    elif problem is not None:
        status = "error"
    elif needs:
        status = "incomplete"
    else:
        status = "configured"
    aliases = sorted(alias for alias, target in ALIASES.items() if target == name)
    return {
        "name": name,
        "title": profile.title or (builtin.title if builtin else ""),
        "aliases": aliases,
        "builtin": builtin is not None,
        "status": status,
        "configured": status == "configured",
        "problem": problem,
        # What the configuration still has to give before the broker can refresh (a client
        # for the authorization code), and the template values each integration may bring.
        "needs": needs,
        "templates": templates,
        "kinds": sorted(profile.kinds),
        "token_url": profile.url_templates.get("token_url", profile.token_url),
        "authorization_url": profile.url_templates.get(
            "authorization_url", profile.authorization_url
        ),
        "revocation_url": profile.url_templates.get("revocation_url", profile.revocation_url),
        "api_base_url": profile.url_templates.get("api_base_url", profile.api_base_url),
        "template_defaults": dict(profile.template_defaults),
        "client_id": profile.client_id,
        "client_secret": "set" if profile.client_secret else None,
        "auth_method": profile.auth_method if AUTHORIZATION_CODE in profile.kinds else None,
        "body_encoding": profile.body_encoding,
        "pkce": profile.pkce,
        "scopes": list(profile.scopes),
        "scope_separator": profile.scope_separator,
        "extra_authorize_params": dict(profile.extra_authorize_params),
        "rotates_refresh_tokens": profile.rotates_refresh_tokens,
        "default_expires_in_seconds": profile.default_expires_in_seconds,
        "refresh_token_idle_lifetime_seconds": profile.refresh_token_idle_lifetime_seconds,
        "refresh_token_lifetime_seconds": profile.refresh_token_lifetime_seconds,
        "adapters": sorted(
            f"{adapter.value}:{profile.adapter_arguments[adapter.value]}"
            if adapter.value in profile.adapter_arguments
            else adapter.value
            for adapter in profile.quirks
        ),
        "docs": profile.docs,
    }


def cmd_list(args: argparse.Namespace) -> int:
    entries = _entries(args)
    columns = [
        ("NAME", "name"),
        ("ALIASES", "aliases"),
        ("STATUS", "status"),
        ("NEEDS", "needs"),
        ("TITLE", "title"),
    ]
    output.records(entries, columns, as_json=args.json, empty="no providers")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    name = ALIASES.get(args.name, args.name)
    for entry in _entries(args):
        if entry["name"] == name:
            output.record(entry, as_json=args.json)
            return EXIT_OK
    raise UsageError(
        f"no provider named {args.name!r} is built in or configured "
        "(broker providers list shows them)"
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    providers = sub.add_parser(
        "providers", help="the provider catalog and configuration: what is known, what is missing"
    ).add_subparsers(dest="sub", required=True)
    plist = providers.add_parser(
        "list", help="every built-in and configured provider, and whether it is configured"
    )
    plist.add_argument("--json", action="store_true")
    plist.set_defaults(func=cmd_list)
    pshow = providers.add_parser("show", help="one provider: endpoints, client, adapters")
    pshow.add_argument("name")
    pshow.add_argument("--json", action="store_true")
    pshow.set_defaults(func=cmd_show)

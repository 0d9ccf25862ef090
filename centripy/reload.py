"""SIGHUP: reload the configuration as Centrifugo v5 does (docs/spec/server_api.md 3).

Centrifugo v5 re-reads its config file on SIGHUP and reloads two things: its rule container
(channel options, namespaces, channel name boundaries, personal channels, client_insecure and
the anonymous-access keys, RPC namespaces, client_connection_limit/_rate_limit) and its token
verifiers (HMAC secret, RSA/ECDSA public keys, JWKS endpoint, audience and issuer, for
connection and subscription tokens). `RELOADABLE` lists those keys. Everything else (ports,
engine, database_url, transports, log settings, ...) needs a restart: a change to it is logged
as ignored. An invalid file (or a missing one) is refused with an error line and the server
keeps running on the config it had.

The new config is built with the loader used at start-up (`load_config`: the same file, the
process environment and the same command-line flags), then `plan_reload` merges its reloadable
keys into the running config and validates the result. `Reloader.__call__` runs on the event
loop (the SIGHUP handler) and swaps the result in without awaiting: one reference replacement
each in the node, the connection context (which every connection reads per command) and its
token verifier, so commands handled after it see the new namespaces and keys and no connection
is dropped. Subscriptions made before keep the options they were made with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from centripy.actors.context import ConnContext
from centripy.engine import channels
from centripy.engine.admission import Admission
from centripy.engine.auth import TokenVerifier
from centripy.engine.config import Config, ConfigError
from centripy.engine.config_check import validate_config
from centripy.engine.config_load import load_config
from centripy.engine.jwks import JWKSCache
from centripy.engine.node import Node
from centripy.engine.proxy import ProxyRoutes

__all__ = ["RELOADABLE", "ConfigSource", "ReloadPlan", "Reloader", "plan_reload"]

log = logging.getLogger("centripy.reload")

_TOKEN_KEYS = (
    "hmac_secret_key",
    "rsa_public_key",
    "ecdsa_public_key",
    "jwks_public_endpoint",
    "audience",
    "audience_regex",
    "issuer",
    "issuer_regex",
    "user_id_claim",
)
# Centrifugo v5's ruleConfig() and jwtVerifierConfig()/subJWTVerifierConfig() keys.
RELOADABLE: Final[frozenset[str]] = frozenset(
    {
        "channel_options",
        "namespaces",
        "channel_private_prefix",
        "channel_namespace_boundary",
        "channel_user_boundary",
        "channel_user_separator",
        "user_subscribe_to_personal",
        "user_personal_single_connection",
        "user_personal_channel_namespace",
        "client_insecure",
        "client_insecure_skip_token_signature_verify",
        "allow_anonymous_connect_without_token",
        "disallow_anonymous_connection_tokens",
        "client_concurrency",
        "rpc_namespace_boundary",
        "rpc_proxy_name",
        "rpc_namespaces",
        "client_connection_limit",
        "client_connection_rate_limit",
        *(f"token_{key}" for key in _TOKEN_KEYS),
        *(f"subscription_token_{key}" for key in _TOKEN_KEYS),
    }
)
_COMPARED = tuple(f.name for f in dataclasses.fields(Config) if f.init)


@dataclass(frozen=True)
class ConfigSource:
    """Where the running config came from: the file, the environment, the CLI flags."""

    path: str
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: os.environ)
    overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def load(self) -> tuple[Config, list[str]]:
        """The config as `serve` would build it now; ConfigError when the file is missing
        or invalid (at start-up a missing file means defaults; on reload it is an error)."""
        if not Path(self.path).is_file():
            raise ConfigError(self.path, "config file not found")
        return load_config(self.path, self.env, self.overrides)


@dataclass(frozen=True)
class ReloadPlan:
    config: Config  # the running config with the reloadable keys of the new one
    changed: tuple[str, ...]  # reloadable keys whose value changes
    ignored: tuple[str, ...]  # other keys whose value differs: they need a restart


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Merge the reloadable keys of `new` into `running` and validate the result (pure;
    ConfigError if the mix is invalid, e.g. a namespace naming a proxy the running config
    does not have)."""
    changed: list[str] = []
    ignored: list[str] = []
    for name in _COMPARED:
        if getattr(running, name) != getattr(new, name):
            (changed if name in RELOADABLE else ignored).append(name)
    merged = dataclasses.replace(running, **{name: getattr(new, name) for name in changed})
    validate_config(merged)
    return ReloadPlan(merged, tuple(changed), tuple(ignored))


class Running(Protocol):
    """What a reload swaps the config in (centripy.server.Services satisfies it)."""

    config: Config
    node: Node
    ctx: ConnContext | None


class Reloader:
    """The SIGHUP handler, installed before the server starts listening (a SIGHUP must
    never take the default action, which ends the process); `attach` gives it the started
    server, and a SIGHUP received before that is acted on then. `fetch` fetches a JWKS
    document (when the new config adds a JWKS endpoint to one that had none). Called on the
    event loop thread."""

    def __init__(
        self, source: ConfigSource | None, fetch: Callable[[str], Awaitable[bytes]]
    ) -> None:
        self._source = source
        self._fetch = fetch
        self._running: Running | None = None
        self._pending = False

    def attach(self, running: Running) -> None:
        """The server has started: reload from now on (now, if a SIGHUP came meanwhile)."""
        self._running = running
        if self._pending:
            self._pending = False
            self()

    def __call__(self) -> bool:
        """Reload once; True when the new config is in effect. Never raises: a failure is
        logged and the running config stays."""
        if self._running is None:
            log.info("SIGHUP received while starting: reloading once started")
            self._pending = True
            return False
        log.info("reloading configuration")
        if self._source is None:
            log.error("error reloading configuration: the server was not started from a file")
            return False
        try:
            new, warnings = self._source.load()
            plan = plan_reload(self._running.config, new)
            verifier = self._verifier(self._running, plan.config)
            ctx = self._running.ctx
            # rpc_proxy_name, rpc_namespaces, rpc_namespace_boundary are read by the routes
            routes = ProxyRoutes(plan.config) if ctx and ctx.proxies else None
        except Exception as exc:  # a signal handler must never take the server down
            log.error("error reloading configuration, keeping the running one: %s", exc)
            return False
        for warning in warnings:
            log.warning("%s", warning)
        if plan.ignored:
            log.warning(
                "changed keys that are not reloadable, ignored until restart: %s",
                ", ".join(plan.ignored),
            )
        self._swap(self._running, plan.config, verifier, routes)
        changed = ", ".join(plan.changed) or "nothing changed"
        log.info("configuration successfully reloaded (%s)", changed)
        return True

    def _verifier(self, running: Running, config: Config) -> TokenVerifier:
        ctx = running.ctx
        jwks = ctx.verifier.jwks if ctx is not None else None
        if jwks is None and (
            config.token_jwks_public_endpoint or config.subscription_token_jwks_public_endpoint
        ):
            jwks = JWKSCache(self._fetch)
        return TokenVerifier(config, jwks=jwks)

    @staticmethod
    def _swap(
        running: Running, config: Config, verifier: TokenVerifier, routes: ProxyRoutes | None
    ) -> None:
        """Replace the references; no await, so no command sees half of it. The proxies
        themselves (`proxies`, the endpoints) are not reloadable, so the back ends the new
        routes name are the ones already built."""
        running.node.config = config
        running.config = config
        ctx = running.ctx
        if ctx is not None:
            limits = (config.client_connection_limit, config.client_connection_rate_limit)
            old = ctx.config
            if limits != (old.client_connection_limit, old.client_connection_rate_limit):
                admission = Admission(*limits, ctx.hub.connection_count)
                admission.refused = ctx.admission.refused
                ctx.admission = admission
            ctx.config = config
            ctx.verifier = verifier
            if ctx.proxies is not None and routes is not None:
                ctx.proxies.routes = routes
        channels.clear_cache()

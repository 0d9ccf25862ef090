"""Event proxies (docs/spec/proxy.md): builds the back end of each configured proxy. An
`http://`/`https://` endpoint gets an `HttpProxyBackend` (all sharing one keep-alive pool),
a `grpc://` one a `GrpcProxyBackend` (`centripy.proxy.grpc`, imported only then)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from centripy.engine.config import Config, ConfigError
from centripy.engine.proxy import Proxies, ProxyBackend, ProxyRoutes, ProxyTarget

if TYPE_CHECKING:  # aiohttp is imported only when a proxy is configured (server start-up time)
    from centripy.proxy.http import HttpPool

__all__ = ["build_proxies"]


def _key(config: Config, target: ProxyTarget) -> str:
    """The config key that set `target`'s endpoint (for error messages)."""
    if config.granular_proxy_mode:
        index = next(i for i, p in enumerate(config.proxies) if p.name == target.name)
        return f"proxies[{index}].endpoint"
    return f"proxy_{target.name}_endpoint"


def _backend(config: Config, target: ProxyTarget, pool: HttpPool) -> ProxyBackend:
    endpoint = target.endpoint
    scheme = endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""
    if scheme in ("http", "https"):
        from centripy.proxy.http import HttpProxyBackend

        return HttpProxyBackend(endpoint, pool)
    if scheme == "grpc":
        try:
            module = importlib.import_module("centripy.proxy.grpc")
            factory = module.GrpcProxyBackend.from_config
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                _key(config, target), f"GRPC proxies are not available: {exc}"
            ) from None
        # in granular mode the name picks the proxies item (several may share an endpoint)
        name = target.name if config.granular_proxy_mode else ""
        backend: ProxyBackend = factory(endpoint, config, name)
        return backend
    raise ConfigError(
        _key(config, target), f"endpoint must be http://, https:// or grpc://, got {endpoint!r}"
    )


def build_proxies(config: Config) -> Proxies | None:
    """The proxies of `config`, or None when none is configured. Raises ConfigError naming
    the key of an endpoint that cannot be served. Call on the event loop."""
    routes = ProxyRoutes(config)
    if not routes.targets:
        return None
    from centripy.proxy.http import HttpPool

    pool = HttpPool()
    backends = {name: _backend(config, t, pool) for name, t in routes.targets.items()}
    return Proxies(routes, backends)

"""Provider kinds: `build_provider`, the one place a provider object is made from its config.

The kinds themselves (`config.KINDS`: kind → the class that serves it) belong to the config, which
validates against them. A kind's module is imported only when a provider of that kind is built:
google-genai alone takes about half a second and tens of MB to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..config import KINDS

if TYPE_CHECKING:
    import aiohttp

    from ..config import ProviderConfig, ServerSettings
    from ..redact import Redactor
    from .base import Provider

__all__ = ["build_provider"]


def build_provider(
    config: ProviderConfig, session: aiohttp.ClientSession, redactor: Redactor, server: ServerSettings
) -> Provider:
    """The provider object for one configured provider, bound by the `server` limits of its config."""
    try:
        module_name, class_name = KINDS[config.kind].split(":")
    except KeyError:
        raise ValueError(f"provider {config.name}: unknown kind {config.kind!r}") from None
    module = importlib.import_module(module_name, __package__)
    provider: Provider = getattr(module, class_name)(config, session, redactor, server)
    return provider

"""Provider kinds: `openai` (passthrough) and `google` (translation through google-genai)."""

from __future__ import annotations

import aiohttp

from ..config import ProviderConfig
from ..redact import Redactor
from ..upstream import Provider
from .openai import OpenAIProvider


def build_provider(config: ProviderConfig, session: aiohttp.ClientSession, redactor: Redactor) -> Provider:
    """The provider object for one configured provider."""
    if config.kind == "google":
        from .google import GoogleProvider

        return GoogleProvider(config, session, redactor)
    return OpenAIProvider(config, session, redactor)

"""Google Gemini through google-genai (translation). Work in progress."""

from __future__ import annotations

from ..config import ProviderConfig
from ..upstream import Call, Reply, StreamReply, UpstreamFailure


class GoogleProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    async def send(self, call: Call) -> Reply | StreamReply:
        raise UpstreamFailure("unsupported", "google provider not implemented yet")

    async def list_models(self, timeout: float) -> list[str]:
        return []

    async def probe(self, timeout: float) -> None:
        return None

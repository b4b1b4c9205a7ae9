"""The `google` provider kind: Gemini through the google-genai SDK (see provider.py)."""

from .provider import GoogleProvider

__all__ = ["GoogleProvider"]

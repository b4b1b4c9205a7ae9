"""manaproxy: a drop-in OpenAI base URL that routes model aliases over provider chains."""

__version__ = "0.1.0"

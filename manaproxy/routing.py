"""Model string → chain of targets.

Rule of this module: pure. No I/O, no clock, no health state: `resolve` depends only on the model
string and the config, so it is table-tested. Which chain entries are usable *right now* is the
health tracker's business (`health.HealthTracker.skip_reason`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ALIAS_PREFIX, Alias, Config, Hedge, Step, Target, lone, targets_of
from .errors import ProxyError

# A bare model name (no "/") is served by this provider, as in the seed service.
BARE_MODEL_PROVIDER = "ollama"
# Longer names are no real model's; they would also make the X-Mana-LLM-Resolved header unreadable.
MAX_MODEL_LENGTH = 512


@dataclass(frozen=True, slots=True)
class Route:
    """What a request's `model` resolved to."""

    requested: str  # what the caller sent ("" when it sent no model)
    alias: str | None  # the alias used, if any (including the default alias)
    steps: tuple[Step, ...]  # the chain: each step one target or a pool of them
    hedge: Hedge | None = None

    @property
    def chain(self) -> tuple[Target, ...]:
        """Every target, in chain order."""
        return targets_of(self.steps)

    @property
    def lone(self) -> bool:
        """The chain is one target (`config.lone`)."""
        return lone(self.steps)

    @classmethod
    def of_alias(cls, requested: str, alias: Alias) -> Route:
        return cls(requested, alias.name, alias.steps, alias.hedge)


def _shown(model: str) -> str:
    # Client-supplied text goes back in the error message; keep it short.
    return model if len(model) <= 150 else model[:150] + "..."


def resolve(model: str | None, config: Config) -> Route:
    """Resolve a request's `model` to an ordered chain, or raise a `ProxyError` (400/404)."""
    if model is None or model == "":
        if config.default is None:
            raise ProxyError(
                400, "request has no 'model' and no default alias is configured", code="model_required", param="model"
            )
        return Route.of_alias("", config.aliases[config.default])

    if len(model) > MAX_MODEL_LENGTH:
        raise ProxyError(
            400, f"model name is longer than {MAX_MODEL_LENGTH} characters", code="invalid_model", param="model"
        )
    if not model.isprintable():
        # It would end up in a response header (X-Mana-LLM-Resolved) and in upstream requests.
        raise ProxyError(400, "model name contains control characters", code="invalid_model", param="model")
    if model.startswith(ALIAS_PREFIX):
        alias = config.aliases.get(model)
        if alias is None:
            raise ProxyError(
                404,
                f"The model '{_shown(model)}' does not exist; see GET /v1/aliases",
                code="model_not_found",
                param="model",
            )
        return Route.of_alias(model, alias)

    if "/" not in model:
        target = Target(BARE_MODEL_PROVIDER, model)
    else:
        try:
            target = Target.parse(model)
        except ValueError:
            raise ProxyError(
                400,
                f"model '{_shown(model)}' is not an alias, provider/model or a bare model name",
                code="invalid_model",
                param="model",
            ) from None
    if target.provider not in config.providers:
        raise ProxyError(
            400,
            f"model '{_shown(model)}' names unknown provider '{_shown(target.provider)}'",
            code="unknown_provider",
            param="model",
        )
    return Route(model, None, (Step.single(target),))

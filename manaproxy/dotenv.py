"""`.env` files: `KEY=VALUE` lines read into the environment, as mana-llm (pydantic-settings) read its `.env`.

Rule of this module: strict, and silent about values. A line is blank, a `#` comment, or `[export ]KEY=VALUE`
with VALUE unquoted (up to a ` #` comment, trimmed), 'single-quoted' (literal) or "double-quoted" (with `\\n`,
`\\t`, `\\r`, `\\\\`, `\\"` escapes), on one line. Anything else is a `DotenvError` naming the file and the line
number — never the line itself, which may hold a key. No `${VAR}` expansion: a value is taken as written.
Variables already in the environment win over the file's (`merge`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

DEFAULT_ENV_FILE = ".env"

_LINE_RE = re.compile(r"^(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}


class DotenvError(ConfigError):
    """An env file cannot be read or has a malformed line; the message names the file and line, not the value."""


@dataclass(frozen=True, slots=True)
class EnvFile:
    """What an env file held and what it changed in the environment it was merged into."""

    path: str
    values: Mapping[str, str]
    kept: frozenset[str]  # names already in the environment: the environment's value wins

    def __repr__(self) -> str:  # names only: the values may be keys
        return f"<EnvFile {self.path} {len(self.values)} variables, {len(self.kept)} kept from the environment>"

    def describe(self) -> str:
        """One line for a log or `check`: counts, and the names the environment overrode. No value."""
        line = f"read {len(self.values)} variables from {self.path}"
        if self.kept:
            line += f" (already in the environment, kept: {', '.join(sorted(self.kept))})"
        return line


def parse(text: str, source: str = "<env>") -> dict[str, str]:
    """The variables of an env file's text, in order; a later line for the same name wins."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE_RE.match(line)
        if match is None:
            raise DotenvError(f"{source}: line {number}: expected KEY=VALUE (a name of letters, digits and '_')")
        name, rest = match.groups()
        try:
            values[name] = _value(rest)
        except ValueError as exc:
            raise DotenvError(f"{source}: line {number}: {name}: {exc}") from None
    return values


def _value(rest: str) -> str:
    if not rest or rest[0] not in "'\"":
        # Unquoted: a comment starts at a '#' after whitespace; `a#b` keeps its '#'.
        return re.split(r"[ \t]#", rest, maxsplit=1)[0].strip()
    quote = rest[0]
    chars: list[str] = []
    index = 1
    while index < len(rest):
        char = rest[index]
        if char == quote:
            tail = rest[index + 1 :].strip()
            if tail and not tail.startswith("#"):
                raise ValueError("unexpected text after the closing quote")
            return "".join(chars)
        if char == "\\" and quote == '"' and index + 1 < len(rest):
            following = rest[index + 1]
            chars.append(_ESCAPES.get(following, "\\" + following))
            index += 2
            continue
        chars.append(char)
        index += 1
    raise ValueError(f"no closing {quote} on the line (values are one line)")


def read(path: str | Path) -> dict[str, str]:
    """The variables of the env file at `path`; `DotenvError` if it cannot be read or is malformed."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DotenvError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DotenvError(f"{source}: not UTF-8 text") from None
    return parse(text, source)


def merge(path: str | Path, environ: MutableMapping[str, str]) -> EnvFile:
    """Read `path` and set each of its variables that `environ` (e.g. `os.environ`) does not have already."""
    values = read(path)
    kept = frozenset(name for name in values if name in environ)
    for name, value in values.items():
        if name not in kept:
            environ[name] = value
    return EnvFile(str(path), values, kept)

"""`manaproxy/dotenv.py`: the strict `.env` parser (table-tested) and the merge where the environment wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from manaproxy.dotenv import DotenvError, merge, parse, read

SECRET = "test-key-dotenv-0123456789"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("\n   \n# a comment\n  # indented comment\n", {}),
        ("A=1\nB=two words\n", {"A": "1", "B": "two words"}),
        ("export A=1\nexport\tB=2\n", {"A": "1", "B": "2"}),
        ("A = spaced  \n", {"A": "spaced"}),
        ("A=\nB=''\nC=\"\"\n", {"A": "", "B": "", "C": ""}),
        ("A=value # a comment\nB=x#not-a-comment\n", {"A": "value", "B": "x#not-a-comment"}),
        ("A='single # kept $X \\n'\n", {"A": "single # kept $X \\n"}),
        ('A="line\\nnext\\t\\"q\\" \\\\ \\x"\n', {"A": 'line\nnext\t"q" \\ \\x'}),
        ('A="quoted" # comment\n', {"A": "quoted"}),
        ("A=${OTHER}\n", {"A": "${OTHER}"}),  # no expansion: taken as written
        ("A=1\nA=2\n", {"A": "2"}),  # a later line wins, as in a shell
        ("\ufeffA=1\r\nB=2\r\n", {"A": "1", "B": "2"}),  # a BOM and CRLF lines
        ("URL=http://h:1/v1?a=b=c\n", {"URL": "http://h:1/v1?a=b=c"}),
        ("_lower_case1=x\n", {"_lower_case1": "x"}),
    ],
)
def test_parse(text: str, expected: dict[str, str]) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("A=1\nnot a variable\n", 2),
        ("A=1\n\n# c\nJUST_A_NAME\n", 4),
        ("1A=x\n", 1),
        ("A-B=x\n", 1),
        (f"A='{SECRET}\n", 1),  # no closing quote: values are one line
        (f'A="{SECRET}\n', 1),
        (f"A='{SECRET}' trailing\n", 1),
        (f"{SECRET}\n", 1),
    ],
)
def test_a_malformed_line_is_named_and_never_shown(text: str, line: int) -> None:
    with pytest.raises(DotenvError) as info:
        parse(text, "x.env")
    message = str(info.value)
    assert message.startswith(f"x.env: line {line}: ")
    assert SECRET not in message


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DotenvError, match=r"missing\.env: cannot read"):
        read(tmp_path / "missing.env")
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"A=\xff\xfe\n")
    with pytest.raises(DotenvError, match=r"binary\.env: not UTF-8"):
        read(binary)


def test_merge_keeps_what_the_environment_has(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(f"GROQ_API_KEY={SECRET}\nOLLAMA_URL=http://from-file:1\nEMPTY_IN_ENV=file\n")
    environ = {"OLLAMA_URL": "http://from-env:2", "EMPTY_IN_ENV": ""}
    loaded = merge(path, environ)
    assert environ == {"OLLAMA_URL": "http://from-env:2", "EMPTY_IN_ENV": "", "GROQ_API_KEY": SECRET}
    assert loaded.kept == {"OLLAMA_URL", "EMPTY_IN_ENV"}
    described = loaded.describe() + repr(loaded)
    assert "3 variables" in described
    assert "EMPTY_IN_ENV, OLLAMA_URL" in described
    assert SECRET not in described
    assert "from-file" not in described

"""`python -m manaproxy` is the `manaproxy` command."""

from .cli import main

raise SystemExit(main())

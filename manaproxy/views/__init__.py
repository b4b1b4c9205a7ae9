"""The read-only HTTP surface: `/health` and `/v1/health` (`health.py`), `/v1/models` and `/v1/aliases`
(`catalog.py`), `/v1/failures` (`failures.py`), `/v1/events` (`events.py`) and the `/status` page (`status.py`).
Rule of this package: views read the gateway's state and never change it, and never show a secret. What they
keep of their own (the ring buffer of recent failures, the event streams) is fed by observers and listeners
after the fact, bounded, and costs the request path at most an append. New GET endpoints for people and
dashboards belong here."""

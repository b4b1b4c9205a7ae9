"""The read-only HTTP surface: `/health` and `/v1/health` (`health.py`), `/v1/models` and `/v1/aliases`
(`catalog.py`). Rule of this package: views read the gateway's state and never change it, and never show a
secret. New GET endpoints for people and dashboards belong here."""

"""The monitoring assets in deploy/: Grafana dashboard, Prometheus alert rules and scrape config.

The dashboard and the alerts may only read metrics manaproxy exports, with labels it sets; the strongest
check runs every dashboard query and every alert expression through real PromQL (`promtool test rules`)
over series taken from a real scrape after varied traffic.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from .fakes import chat_completion, json_reply
from .helpers import ask, build_config, run_promtool, scrape, varied_traffic

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "mana-llm.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
SCRAPE = DEPLOY / "prometheus" / "scrape.yml"

# The existing dashboard's queries, verbatim from issue 4 (`{provider="..."}` spelled out per provider).
SEED_QUERIES = [
    'up{job="mana-llm"}',
    "sum(rate(mana_llm_llm_requests_total[5m])) * 60",
    "sum(rate(mana_llm_llm_errors_total[5m])) / (sum(rate(mana_llm_llm_requests_total[5m])) + 0.001) * 100",
    'sum(rate(mana_llm_llm_requests_total{provider="google"}[5m])) / (sum(rate(mana_llm_llm_requests_total[5m])) + 0.001) * 100',
    *(
        f"histogram_quantile({q}, sum(rate(mana_llm_llm_latency_seconds_bucket{sel}[5m])) by (le))"
        for q in ("0.50", "0.90", "0.99")
        for sel in ("", '{provider="ollama"}', '{provider="google"}')
    ),
    "sum(rate(mana_llm_tokens_total[5m])) * 60",
    'sum(rate(mana_llm_tokens_total{type="prompt"}[5m])) * 60',
    'sum(rate(mana_llm_tokens_total{type="completion"}[5m])) * 60',
    "sum(rate(mana_llm_llm_requests_total[5m])) by (provider)",
    "sum(rate(mana_llm_llm_requests_total[5m])) by (model)",
    "sum(rate(mana_llm_llm_errors_total[5m])) by (error_type)",
    'sum(increase(mana_llm_llm_requests_total{provider="ollama"}[24h]))',
    'sum(increase(mana_llm_llm_requests_total{provider="google"}[24h]))',
]
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}

_METRIC_RE = re.compile(r"\b(mana_llm_[a-z0-9_]+)\b(?:\s*\{([^}]*)\})?")
_MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


# The one dashboard variable a query may use (the per-client panels repeat over it), and what promtool reads for it.
VARIABLES = {"$client": ".+"}


def dashboard_exprs() -> list[str]:
    """Every panel query, the `$client` variable expanded as "all clients"."""
    exprs = [target["expr"] for panel in dashboard()["panels"] if panel["type"] != "row" for target in panel["targets"]]
    for variable, value in VARIABLES.items():
        exprs = [expr.replace(variable, value) for expr in exprs]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# -- the dashboard file ----------------------------------------------------------------------------


def test_dashboard_is_importable_with_a_prometheus_datasource_input():
    board = dashboard()

    assert board["title"] == "mana-llm"
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["client"]["definition"] == "label_values(mana_llm_client_requests_total, client)"
    repeated = [p for p in board["panels"] if p.get("repeat")]
    assert [p["repeat"] for p in repeated] == ["client"]  # a panel per client
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            expr = target["expr"]
            for variable in VARIABLES:
                expr = expr.replace(variable, "")
            assert "$" not in expr, target["expr"]  # no variable the promtool check cannot expand
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        assert grid["w"] > 0
        assert grid["h"] > 0


def test_dashboard_keeps_every_seed_query_verbatim():
    exprs = dashboard_exprs()
    for query in SEED_QUERIES:
        assert query in exprs, query


def test_dashboard_has_the_gateway_panels():
    exprs = "\n".join(dashboard_exprs())
    titles = [p["title"] for p in dashboard()["panels"]]
    for metric in (
        "mana_llm_time_to_first_byte_seconds_bucket",
        "mana_llm_stream_outcomes_total",
        "mana_llm_provider_healthy",
        "mana_llm_proxy_overhead_seconds_bucket",
        "mana_llm_requests_in_flight",
        "mana_llm_fallback_total",
        "mana_llm_alias_healthy_targets",
    ):
        assert metric in exprs, metric
    for title in ("Requests / min", "Error rate %", "Tokens / min", "Requests by provider", "Requests by model"):
        assert title in titles


# -- names and labels: only what manaproxy exports -------------------------------------------------


async def test_dashboard_and_alerts_read_only_exported_metrics_and_labels(make_upstream, make_proxy):
    fresh = await make_proxy(build_config({"a": "http://127.0.0.1:9/v1"}, {"mana/x": ["a/m"]}))
    exported: set[str] = set()
    for family in fresh.registry.collect():
        if family.name.startswith("mana_llm_"):
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            exported.update(family.name + suffix for suffix in suffixes)
    proxy = await varied_traffic(make_upstream, make_proxy)
    labels_of: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(await scrape(proxy)):
        for sample in family.samples:
            labels_of.setdefault(sample.name, set()).update(sample.labels)

    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    used = set()
    for expr in exprs:
        in_expr: set[str] = set(TARGET_LABELS)
        for name, matchers in _METRIC_RE.findall(expr):
            used.add(name)
            assert name in exported, f"{name} is not exported (in {expr})"
            known = labels_of[name] | TARGET_LABELS
            in_expr |= known
            for label in _MATCHER_RE.findall(matchers):
                assert label in known, f"{name} has no label {label} (in {expr})"
        for grouping in _GROUPING_RE.findall(expr):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in in_expr, f"no metric in {expr!r} has label {label}"
    # Everything that is exported is shown somewhere.
    assert {name for name in exported if not name.endswith(("_sum", "_count"))} - used <= set()


async def test_every_dashboard_query_and_alert_expression_returns_data_on_a_real_scrape(
    make_upstream, make_proxy, tmp_path
):
    """Real PromQL over series from a real scrape: counters ramp from 0 to 15x their scraped value."""
    proxy = await varied_traffic(make_upstream, make_proxy)
    series = []
    for family in text_string_to_metric_families(await scrape(proxy)):
        if not family.name.startswith("mana_llm_"):
            continue
        for sample in family.samples:
            labels = {"job": "mana-llm", "instance": "127.0.0.1:3025", **sample.labels}
            selector = sample.name + "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in labels.items()) + "}"
            ramp = family.type in ("counter", "histogram")
            values = f"0+{sample.value!r}x15" if ramp else f"{sample.value!r}+0x15"
            series.append({"series": selector, "values": values})

    queries = [expr for expr in dashboard_exprs() if not expr.startswith("up{")]
    # An alert expression without its threshold must return data: its vector matching fits the real labels.
    queries += [re.sub(r"\s*(==|>|<)\s*[0-9.]+\s*$", "", rule["expr"].strip()) for rule in alert_rules()]
    rules = {
        "groups": [
            {
                "name": "queries",
                "rules": [{"alert": f"Q{i}", "expr": f"count(({q})) > 0"} for i, q in enumerate(queries)],
            }
        ]
    }
    tests = {
        "rule_files": ["queries.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": f"Q{i}", "exp_alerts": [{"exp_labels": {}}]}
                    for i in range(len(queries))
                ],
            }
        ],
    }
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "queries_test.yml").write_text(yaml.safe_dump(tests))

    result = await asyncio.to_thread(run_promtool, "test", "rules", "queries_test.yml", cwd=tmp_path)

    output = result.stdout + result.stderr
    failed = sorted({int(n) for n in re.findall(r"alertname: Q(\d+),", output)})
    assert result.returncode == 0, "no data for:\n" + "\n".join(queries[i] for i in failed) + "\n" + output[-2000:]


# -- alerts on real traffic -------------------------------------------------------------------------------


def series_lines(text: str, name: str) -> list[str]:
    """`name{labels}` of every sample of `name` in a scrape, with the job/instance Prometheus adds."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = line[len(name) + 1 : line.index("}")]
            out.append(f'{name}{{job="mana-llm", instance="a:3025", {labels}}}')
    return out


async def test_a_provider_without_a_key_does_not_fire_the_fallback_ratio_alert(make_upstream, make_proxy, tmp_path):
    """Leaving a provider's key unset is a normal deployment (the shipped chains name five providers):
    skipping it on every request is no sign that first choices are failing."""
    b = await make_upstream("b")
    b.default = json_reply(chat_completion("m2"))
    proxy = await make_proxy(build_config({"g": {"base_url": b, "api_key": ""}, "b": b}, {"mana/x": ["g/m1", "b/m2"]}))
    for _ in range(3):
        assert await ask(proxy) == "b/m2"
    text = await (await proxy.client.get("/metrics")).text()
    (fallback,) = series_lines(text, "mana_llm_fallback_total")
    (requests,) = series_lines(text, "mana_llm_llm_requests_total")
    assert 'reason="unconfigured"' in fallback
    assert (
        proxy.registry.get_sample_value(
            "mana_llm_fallback_total", {"from_model": "g/m1", "to_model": "b/m2", "reason": "unconfigured"}
        )
        == proxy.registry.get_sample_value(
            "mana_llm_llm_requests_total", {"provider": "b", "model": "m2", "streaming": "false"}
        )
        == 3
    )

    # The same traffic, one request per second for 40 minutes: every request skips g.
    series = [{"series": fallback, "values": "0+60x40"}, {"series": requests, "values": "0+60x40"}]
    case = {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [{"eval_time": "40m", "alertname": "ManaLLMFallbackRatioHigh", "exp_alerts": []}],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [case]}))
    result = await asyncio.to_thread(run_promtool, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- Prometheus files ------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_alert_rule_unit_tests_pass():
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        test["alertname"]
        for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for test in case["alert_rule_test"]
    }
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_alerts_cover_the_issue():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert rules["ManaLLMProviderDown"]["for"] == "5m"
    assert "mana_llm_provider_healthy" in rules["ManaLLMProviderDown"]["expr"]
    assert "mana_llm_alias_healthy_targets" in rules["ManaLLMAliasAllEntriesUnhealthy"]["expr"]
    assert "mana_llm_llm_errors_total" in rules["ManaLLMErrorRatioHigh"]["expr"]
    assert "mana_llm_fallback_total" in rules["ManaLLMFallbackRatioHigh"]["expr"]
    assert "histogram_quantile(0.95" in rules["ManaLLMTimeToFirstByteHigh"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_scrape_config_is_valid_and_names_the_dashboard_job():
    result = run_promtool("check", "config", str(SCRAPE))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(SCRAPE.read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == ["mana-llm"]
    assert config["scrape_configs"][0]["metrics_path"] == "/metrics"

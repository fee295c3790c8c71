#!/usr/bin/python3
"""Checks the monitoring files against the metrics mailpumpd serves.

deploy/monitoring/mailpump-rules.yml (plain Prometheus rules, the one source),
deploy/k8s/monitoring/prometheusrule.yaml (generated from it) and
deploy/monitoring/grafana-dashboard.json: every PromQL expression they hold is
reduced to the metric names it selects, and each must be a family of the
docs/operations.md metric table (the table test_metrics_ops.c and
test_metrics_doc.py keep equal to /metrics), a histogram's with its
_bucket/_sum/_count series, or a recording rule of the rules file, or `up`.
promtool (Debian's prometheus package, installed by tests/run) checks the
rules file and the PrometheusRule's spec, parses every dashboard expression,
and runs the rule unit tests in deploy/monitoring/tests/. A missing promtool
is a failure, not a skip. See docs/operations.md, "Dashboards and alerts".
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("MAILPUMP_SOURCE_DIR") or os.path.dirname(os.path.dirname(HERE))
RULES = os.path.join(ROOT, "deploy", "monitoring", "mailpump-rules.yml")
PROMRULE = os.path.join(ROOT, "deploy", "k8s", "monitoring", "prometheusrule.yaml")
DASHBOARD = os.path.join(ROOT, "deploy", "monitoring", "grafana-dashboard.json")
RULE_TESTS = os.path.join(ROOT, "deploy", "monitoring", "tests")
OPS_DOC = os.path.join(ROOT, "docs", "operations.md")
GEN = os.path.join(ROOT, "deploy", "monitoring", "gen-prometheusrule.py")

# PromQL words that are not metric names: aggregations and functions are
# recognised by the "(" that follows them; these are the rest
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "and", "or", "unless", "offset", "atan2", "inf", "nan", "start", "end"}
# aggregations, which may put "by (...)" or "without (...)" before their "("
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
# modifiers followed by a list of label names
LABEL_LISTS = ("by", "without", "on", "ignoring", "group_left", "group_right")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'
                   r'|\{[^}]*\}|\[[^\]]*\]'
                   r'|\d[\w.]*'
                   r'|[A-Za-z_:][\w:]*'
                   r'|\$\{?\w+\}?'
                   r'|\S')


def metric_table(path=OPS_DOC):
    """{family: type} from docs/operations.md's table of what /metrics serves."""
    table = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\|\s*`([a-z_:][a-z0-9_:]*)(?:\{[^`]*\})?`\s*\|\s*(counter|gauge|histogram)\s*\|",
                         line)
            if m:
                table[m.group(1)] = m.group(2)
    return table


def metric_names(expr):
    """Metric names a PromQL expression selects (bare or before { or [)."""
    toks = TOKEN.findall(expr)
    names = set()
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        if t in LABEL_LISTS and nxt == "(":
            # skip the label list
            j = i + 2
            while j < len(toks) and toks[j] != ")":
                j += 1
            i = j + 1
            continue
        if t in AGGREGATIONS and nxt in ("by", "without"):
            i += 1
            continue
        if re.fullmatch(r"[A-Za-z_:][\w:]*", t) and nxt != "(" and t.lower() not in KEYWORDS:
            names.add(t)
        i += 1
    return names


def known_name(name, table, recorded):
    if name in table or name in recorded or name == "up":
        return True
    for s in HISTOGRAM_SUFFIXES:
        if name.endswith(s) and table.get(name[:-len(s)]) == "histogram":
            return True
    return False


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def rule_groups():
    return load_yaml(RULES)["groups"]


def promrule_groups():
    doc = load_yaml(PROMRULE)
    assert doc["kind"] == "PrometheusRule", doc["kind"]
    return doc["spec"]["groups"]


def dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def all_panels(dash):
    for p in dash["panels"]:
        yield p
        for q in p.get("panels", []):
            yield q


def dashboard_exprs(dash):
    return [(p["title"], t["expr"]) for p in all_panels(dash) for t in p.get("targets", [])]


def grafana_to_promql(expr):
    """A dashboard expression with Grafana's variables replaced, for promtool."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    expr = expr.replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def promtool():
    return shutil.which("promtool")


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


class ExtractTest(unittest.TestCase):
    """The extraction itself, so that the checks below can fail."""

    def test_names(self):
        self.assertEqual(metric_names(
            'sum by (job, le) (rate(a_b_total{x="y",job=~"$job"}[5m])) / ignoring (reason) '
            'group_left sum without (instance) (c:d:rate5m) > 0 and on (job) up{job="m"} == 0'),
            {"a_b_total", "c:d:rate5m", "up"})
        self.assertEqual(metric_names("histogram_quantile(0.9, sum by (le) (rate(h_bucket[$__rate_interval])))"),
                         {"h_bucket"})
        self.assertEqual(metric_names("time() - max(process_start_time_seconds offset 5m)"),
                         {"process_start_time_seconds"})
        self.assertEqual(metric_names('{__name__="x"}'), set())
        self.assertEqual(metric_names("sum by (outcome) (x_total) / count without (le) (y)"),
                         {"x_total", "y"})

    def test_known(self):
        table = {"h_seconds": "histogram", "c_total": "counter"}
        self.assertTrue(known_name("h_seconds_bucket", table, set()))
        self.assertFalse(known_name("c_total_bucket", table, set()))
        self.assertFalse(known_name("nope_total", table, set()))
        self.assertTrue(known_name("r:x", table, {"r:x"}))

    def test_table(self):
        table = metric_table()
        self.assertGreaterEqual(len(table), 60)
        self.assertEqual(table["mailpump_delivery_latency_seconds"], "histogram")
        self.assertEqual(table["mailpump_workers_blocked"], "gauge")
        self.assertEqual(table["process_cpu_seconds_total"], "counter")


class NamesMixin:

    def check_metric_names(self, exprs, recorded):
        table = metric_table()
        unknown, used = [], set()
        for where, expr in exprs:
            names = metric_names(expr)
            self.assertTrue(names, "%s: no metric in %r" % (where, expr))
            for n in sorted(names):
                if not known_name(n, table, recorded):
                    unknown.append("%s: %s" % (where, n))
            used |= names
        self.assertEqual(unknown, [], "metrics not in docs/operations.md's table")
        return used

    def recorded(self):
        return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


class RulesTest(NamesMixin, unittest.TestCase):

    def test_one_source(self):
        self.assertEqual(promrule_groups(), rule_groups(),
                         "prometheusrule.yaml differs from mailpump-rules.yml: "
                         "run deploy/monitoring/gen-prometheusrule.py")
        r = run([sys.executable, GEN, "--check"])
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_alerts(self):
        want = {"MailpumpDown", "MailpumpBacklogGrowing", "MailpumpBounceRateHigh",
                "MailpumpDeferralRateHigh", "MailpumpLedgerUnavailable", "MailpumpBrokerBlocked",
                "MailpumpWorkersNotReady", "MailpumpTlsFallbacksRising", "MailpumpApiServerErrors"}
        alerts = {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}
        self.assertEqual(set(alerts), want)
        with open(OPS_DOC) as f:
            doc = f.read()
        sections = set(re.findall(r"^#+ (.+)$", doc, re.M))
        for name, r in alerts.items():
            self.assertTrue(r.get("for"), name)
            self.assertIn(r["labels"]["severity"], ("warning", "critical"), name)
            ann = r["annotations"]
            self.assertTrue(ann.get("summary"), name)
            refs = re.findall(r'docs/operations\.md, ((?:"[^"]+"(?:, | and |,? and )?)+)', ann["description"])
            self.assertTrue(refs, "%s: description names no docs/operations.md section" % name)
            for sec in re.findall(r'"([^"]+)"', " ".join(refs)):
                self.assertIn(sec, sections, "%s: no section %r in docs/operations.md" % (name, sec))
            self.assertTrue("`%s`" % name in doc, "%s is not described in docs/operations.md" % name)
        self.assertIn('up{job=~"mailpump.*"} == 0', alerts["MailpumpDown"]["expr"])
        self.assertIn("rabbitmq_queue_messages", alerts["MailpumpBacklogGrowing"]["annotations"]["description"])

    def test_rule_metrics(self):
        for groups in (rule_groups(), promrule_groups()):
            exprs = [(r.get("alert") or r.get("record"), str(r["expr"]))
                     for g in groups for r in g["rules"]]
            self.check_metric_names(exprs, self.recorded())

    def test_promtool_rules(self):
        self.assertTrue(promtool(), "promtool missing: install Debian's prometheus package "
                        "(tests/run does)")
        r = run([promtool(), "check", "rules", RULES])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        with tempfile.TemporaryDirectory() as d:
            spec = os.path.join(d, "prometheusrule-spec.yml")
            with open(spec, "w") as f:
                yaml.safe_dump({"groups": promrule_groups()}, f)
            r = run([promtool(), "check", "rules", spec])
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_promtool_unit_tests(self):
        self.assertTrue(promtool(), "promtool missing")
        tests = sorted(os.path.join(RULE_TESTS, f) for f in os.listdir(RULE_TESTS)
                       if f.endswith((".yml", ".yaml")))
        self.assertTrue(tests)
        r = run([promtool(), "test", "rules"] + tests, cwd=RULE_TESTS)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


class DashboardTest(NamesMixin, unittest.TestCase):

    def test_importable(self):
        d = dashboard()
        self.assertGreaterEqual(d["schemaVersion"], 36)
        self.assertEqual([i["name"] for i in d["__inputs"]], ["DS_PROMETHEUS"])
        self.assertEqual(d["__inputs"][0]["pluginId"], "prometheus")
        variables = {v["name"]: v for v in d["templating"]["list"]}
        self.assertEqual(set(variables), {"job", "instance"})
        cells = set()
        for p in d["panels"]:
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                    for y in range(g["y"], g["y"] + g["h"])}
            self.assertFalse(area & cells, "panel %r overlaps another" % p["title"])
            cells |= area
        ids = [p["id"] for p in all_panels(d)]
        self.assertEqual(len(ids), len(set(ids)), "panel ids repeat")
        for p in all_panels(d):
            if p["type"] == "row":
                continue
            self.assertEqual(p["datasource"]["uid"], "${DS_PROMETHEUS}", p["title"])
            self.assertTrue(p["targets"], p["title"])
            refs = [t["refId"] for t in p["targets"]]
            self.assertEqual(len(refs), len(set(refs)), p["title"])
            for t in p["targets"]:
                self.assertEqual(t["datasource"]["uid"], "${DS_PROMETHEUS}", p["title"])
                self.assertIn('job=~"$job"', t["expr"], p["title"])
                self.assertIn('instance=~"$instance"', t["expr"], p["title"])

    def test_dashboard_metrics(self):
        d = dashboard()
        used = self.check_metric_names(dashboard_exprs(d), self.recorded())
        # what the dashboard is for: each of these has a panel
        for m in ("mailpump_recipients_total", "mailpump_delivery_latency_seconds_bucket",
                  "mailpump_message_age_seconds_bucket", "mailpump_smtp_command_seconds_bucket",
                  "mailpump_smtp_connections", "mailpump_messages_inflight", "mailpump_inflight_bytes",
                  "mailpump_site_parked_total", "mailpump_site_waiting",
                  "mailpump_recipients_by_site_total", "mailpump_ledger_unavailable_total",
                  "mailpump_lease_fallback", "mailpump_rate_limit_redis_errors_total",
                  "mailpump_workers_blocked", "mailpump_publish_failed_total", "mailpump_dns_lookups_total",
                  "mailpump_dns_lookup_seconds_bucket", "mailpump_api_requests_total",
                  "mailpump_api_server_errors_total", "process_cpu_seconds_total",
                  "process_resident_memory_bytes", "process_open_fds", "mailpump_build_info"):
            self.assertIn(m, used)
        quantiles = [e for _, e in dashboard_exprs(d) if "histogram_quantile" in e]
        for q in quantiles:
            self.assertRegex(q, r"sum by \(le[,)]", q)

    def test_promtool_parses_dashboard(self):
        self.assertTrue(promtool(), "promtool missing")
        rules = [{"record": "dashboard:expr:%d" % i, "expr": grafana_to_promql(e)}
                 for i, (_, e) in enumerate(dashboard_exprs(dashboard()))]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "dashboard.yml")
            with open(path, "w") as f:
                yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
            r = run([promtool(), "check", "rules", path])
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)

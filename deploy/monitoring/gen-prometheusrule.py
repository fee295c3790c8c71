#!/usr/bin/python3
"""Generate deploy/k8s/monitoring/prometheusrule.yaml from mailpump-rules.yml.

The plain rules file (deploy/monitoring/mailpump-rules.yml) is the one source
of the alerts: this wraps its groups in a Prometheus Operator PrometheusRule.
Run it after editing the rules file; tests/deploy/test_monitoring.py fails
while the two differ.

  gen-prometheusrule.py           rewrite the PrometheusRule
  gen-prometheusrule.py --check   exit 1 if the PrometheusRule is stale
"""
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "mailpump-rules.yml")
DST = os.path.join(HERE, "..", "k8s", "monitoring", "prometheusrule.yaml")

HEADER = """\
# GENERATED from deploy/monitoring/mailpump-rules.yml by
# deploy/monitoring/gen-prometheusrule.py: edit that file, then run the script.
# What each alert means and what to do: docs/operations.md, "Dashboards and
# alerts". The depth of mail.outbound itself is RabbitMQ's metric (its
# Prometheus plugin), not mailpumpd's: alert on it there too.
"""


class Dumper(yaml.SafeDumper):
    pass


def _str(dumper, s):
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


Dumper.add_representer(str, _str)


def render(groups):
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "mailpumpd",
            "labels": {
                "app.kubernetes.io/name": "mailpump",
                "app.kubernetes.io/component": "worker",
            },
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=1000,
                              default_flow_style=False, allow_unicode=True)


def main():
    with open(SRC) as f:
        groups = yaml.safe_load(f)["groups"]
    text = render(groups)
    if sys.argv[1:] == ["--check"]:
        with open(DST) as f:
            if f.read() != text:
                print("%s is stale: run %s" % (DST, sys.argv[0]), file=sys.stderr)
                return 1
        return 0
    with open(DST, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

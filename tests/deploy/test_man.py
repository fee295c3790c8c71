#!/usr/bin/env python3
"""tests/deploy/test_man.py - the man pages are complete and render cleanly.

Usage: test_man.py MAILPUMPD MAN_DIR SOURCE_DIR
  MAILPUMPD   the built daemon
  MAN_DIR     where the build wrote mailpumpd.ini.5 (the `man` target)
  SOURCE_DIR  the repository (docs/man/mailpumpd.8, docs/man/mailpump.1)

Checks (each prints "ok" or "FAIL" with the reason; any FAIL exits 1):
  keys     mailpumpd.ini.5 is `mailpumpd --print-config-reference --format man`
           and lists every [section] and key of the Markdown reference, in its
           order, each key as a .TP/.B entry under its .SS [section] with its
           MAILPUMP_<SECTION>_<KEY> variable
  render   each page renders with `man -l --warnings` (man-db), else
           `nroff -ww -man`, with nothing on stderr; without either, its
           roff structure (.TH first, NAME and SYNOPSIS sections) is checked
"""
import os
import re
import shutil
import subprocess
import sys

failures = []


def check(name, problems):
    if problems:
        failures.append(name)
        for p in problems:
            print(f"FAIL {name}: {p}")
    else:
        print(f"ok   {name}")


def markdown_keys(daemon):
    """[(section, key)] in the order of the Markdown reference."""
    out = subprocess.run([daemon, "--print-config-reference"], check=True,
                         capture_output=True, text=True).stdout
    keys, section = [], None
    for line in out.splitlines():
        m = re.match(r"^## \[([a-z0-9_]+)\]$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^\| `([a-z0-9_]+)` \| ", line)
        if m and section:
            keys.append((section, m.group(1)))
    return keys


def man_keys(text):
    """[(section, key, body)] of the man page's KEYS: .SS [s] / .TP / .B key / body."""
    keys, section = [], None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\.SS \[([a-z0-9_]+)\]$", line)
        if m:
            section = m.group(1)
            continue
        if line == ".TP" and i + 1 < len(lines) and section:
            m = re.match(r"^\.B ([a-z0-9_]+)$", lines[i + 1])
            if m:
                body = []
                for b in lines[i + 2:]:
                    if b.startswith((".TP", ".SS", ".SH")):
                        break
                    body.append(b)
                keys.append((section, m.group(1), "\n".join(body)))
    return keys


def check_keys(daemon, page):
    problems = []
    want = markdown_keys(daemon)
    if len(want) < 50:
        problems.append(f"only {len(want)} keys in the Markdown reference")
    gen = subprocess.run([daemon, "--print-config-reference", "--format", "man"],
                         check=True, capture_output=True, text=True).stdout
    with open(page) as f:
        text = f.read()
    if text != gen:
        problems.append(f"{page} is not the output of --print-config-reference --format man")
    got = man_keys(text)
    if [(s, k) for s, k, _ in got] != want:
        have = {(s, k) for s, k, _ in got}
        missing = [f"[{s}] {k}" for s, k in want if (s, k) not in have]
        extra = [f"[{s}] {k}" for s, k, _ in got if (s, k) not in set(want)]
        problems.append(f"keys differ from the Markdown reference: missing {missing[:10]}, "
                        f"extra {extra[:10]}" if missing or extra else "keys out of order")
    for s, k, body in got:
        env = f"MAILPUMP_{s}_{k}".upper()
        if env not in body.replace("\\%", ""):
            problems.append(f"[{s}] {k}: no {env}")
        if not re.search(r"default (\\fB|empty)", body):
            problems.append(f"[{s}] {k}: no default")
    return problems


def check_render(pages):
    problems = []
    env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80", MAN_KEEP_FORMATTING="")
    for page in pages:
        with open(page) as f:
            text = f.read()
        if shutil.which("man"):
            cmd = ["man", "--warnings", "-l", page]
        elif shutil.which("nroff"):
            cmd = ["nroff", "-ww", "-man", page]
        else:
            cmd = None
        if cmd:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0 or r.stderr.strip():
                problems.append(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[:500]}")
            elif "NAME" not in r.stdout or "SYNOPSIS" not in r.stdout:
                problems.append(f"{page}: rendered without NAME or SYNOPSIS")
        body = [l for l in text.splitlines() if not l.startswith('.\\"')]
        if not body or not body[0].startswith(".TH "):
            problems.append(f"{page}: the first request is not .TH")
        for sec in (".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH SEE ALSO"):
            if sec not in body:
                problems.append(f"{page}: no {sec}")
    return problems


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    daemon, man_dir, src = sys.argv[1:]
    ini5 = os.path.join(man_dir, "mailpumpd.ini.5")
    check("keys", check_keys(daemon, ini5))
    check("render", check_render([ini5, os.path.join(src, "docs/man/mailpumpd.8"),
                                  os.path.join(src, "docs/man/mailpump.1")]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

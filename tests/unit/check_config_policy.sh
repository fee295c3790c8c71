#!/bin/sh
# mailpumpd --check-config loads the egress and shaping files: the
# examples in deploy/ give their one-line summary (exit 0), a broken file
# its file:line error (exit 2).
# Usage: check_config_policy.sh MAILPUMPD SOURCE_DIR
set -u
[ $# -eq 2 ] || { echo "usage: $0 MAILPUMPD SOURCE_DIR" >&2; exit 2; }
tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# start-up binds every source: the example's documentation addresses
# become loopback ones this host has
sed -e 's/^address = 192\.0\.2\.\([0-9]*\)/address = 127.0.0.\1/' \
    -e 's/^address = 198\.51\.100\.\([0-9]*\)/address = 127.0.0.\1/' \
    -e 's/^address = 2001:db8:.*/address = 127.0.0.21/' "$2/deploy/egress.example.ini" >"$tmp/egress.example.ini"
MAILPUMP_EGRESS_FILE="$tmp/egress.example.ini" MAILPUMP_SHAPING_FILE="$2/deploy/shaping.example.ini" \
    "$1" --check-config >"$tmp/out" 2>"$tmp/err" || fail "the examples: exit $? ($(cat "$tmp/err"))"
want="# egress: 4 sources, 2 pools, 2 tenant mappings, default pool transactional; shaping: 6 rules, 8 automations"
grep -qxF "$want" "$tmp/out" || fail "no summary line \"$want\" in: $(grep '^#' "$tmp/out")"

"$1" --check-config >"$tmp/out" 2>"$tmp/err" || fail "defaults: exit $?"
grep -qxF "# egress: 0 sources, 0 pools, 0 tenant mappings; shaping: 0 rules, 0 automations" "$tmp/out" ||
    fail "defaults: no empty summary in: $(grep '^#' "$tmp/out")"

printf '[source a]\naddress = 192.0.2.1\n[pool p]\nsources = a b\n' >"$tmp/egress.ini"
MAILPUMP_EGRESS_FILE="$tmp/egress.ini" "$1" --check-config >"$tmp/out" 2>"$tmp/err"
rc=$?
[ $rc -eq 2 ] || fail "a broken egress file: exit $rc, expected 2"
want="mailpumpd: configuration error: $tmp/egress.ini:4: [pool p] sources: unknown source \"b\" (no [source b])"
grep -qxF "$want" "$tmp/err" || fail "expected \"$want\", got: $(cat "$tmp/err")"
[ -s "$tmp/out" ] && fail "a broken file still printed the configuration"
MAILPUMP_EGRESS_FILE="$2/deploy/egress.example.ini" "$1" --check-config >"$tmp/out" 2>"$tmp/err"
rc=$?
[ $rc -eq 2 ] || fail "an address this host does not have: exit $rc, expected 2"
want="mailpumpd: configuration error: [egress] file: source mta1: source address 192.0.2.10 cannot be bound: Cannot assign requested address"
grep -qxF "$want" "$tmp/err" || fail "expected \"$want\", got: $(cat "$tmp/err")"
echo "ok: --check-config loads the egress and shaping files"

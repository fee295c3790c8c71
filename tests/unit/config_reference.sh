#!/bin/sh
# docs/configuration.md must be exactly what the daemon prints with
# --print-config-reference (generated from core/config.c's key table):
# fails, showing the difference, when one was changed without the other.
# Usage: config_reference.sh MAILPUMPD DOCS_FILE
set -u
[ $# -eq 2 ] || { echo "usage: $0 MAILPUMPD DOCS_FILE" >&2; exit 2; }
out=$(mktemp) || exit 1
trap 'rm -f "$out"' EXIT
if ! "$1" --print-config-reference >"$out"; then
    echo "FAIL: $1 --print-config-reference exited with an error" >&2
    exit 1
fi
if ! diff -u "$2" "$out"; then
    echo "FAIL: $2 differs from the key table (- file, + generated);" \
         "regenerate it: mailpumpd --print-config-reference > docs/configuration.md" >&2
    exit 1
fi
echo "ok: $2 is the generated reference ($(grep -c '^| `' "$out") keys)"

#!/usr/bin/env bash
# tests/deploy/package.sh - the Debian package builds, holds what it should,
# installs, runs and purges cleanly.
#
# Usage: tests/deploy/package.sh [SOURCE_DIR]   (root; dpkg-deb, dpkg)
#
# Builds the tree in a scratch directory (Release, MAILPUMP_TESTS=OFF),
# makes the package with `cpack -G DEB`, and checks with dpkg-deb: the
# version is project(VERSION), the file list (binaries, unit, default ini,
# man pages, docs), the conffiles (exactly /etc/mailpump/mailpumpd.ini) and
# Depends (the shared libraries' packages). Then installs it with dpkg -i
# into this machine (refusing if mailpump is installed already), runs the
# installed `mailpumpd --check-config --config /etc/mailpump/mailpumpd.ini`
# (connects to nothing), `mailpumpd --version`, `mailpump --help`, `man -w`
# on the three pages, `systemd-analyze verify` on the installed unit (when
# systemd-analyze exists), checks the unit's hardening and that its
# TimeoutStopSec exceeds the installed [worker] shutdown_grace_ms, and purges
# the package, checking nothing of it is left. Exits 1 on any failure.
set -euo pipefail
SRC=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
fail=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1: $2"; fail=1; }

[ "$(id -u)" = 0 ] || { echo "package.sh: needs root (dpkg -i)" >&2; exit 1; }
for t in cmake cpack dpkg-deb dpkg; do
  command -v "$t" >/dev/null || { echo "package.sh: $t missing" >&2; exit 1; }
done

# one run at a time on this machine: the install is system-wide
exec 9>/tmp/mailpump-package-test.lock
flock -w 300 9

if dpkg-query -W -f='${Status}' mailpump 2>/dev/null | grep -q installed; then
  echo "package.sh: a mailpump package is installed already; not touching it" >&2
  exit 1
fi
for f in /usr/bin/mailpumpd /usr/bin/mailpump /etc/mailpump; do
  [ ! -e "$f" ] || { echo "package.sh: $f exists (not from a package); not touching it" >&2; exit 1; }
done

TMP=$(mktemp -d /tmp/mailpump-package.XXXXXX)
installed=0
cleanup() {
  [ "$installed" = 1 ] && dpkg --purge mailpump >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT

echo "== build and package ($TMP)"
cmake -S "$SRC" -B "$TMP/build" -DCMAKE_BUILD_TYPE=Release -DMAILPUMP_TESTS=OFF >"$TMP/log" 2>&1 ||
  { cat "$TMP/log"; exit 1; }
cmake --build "$TMP/build" -j2 >>"$TMP/log" 2>&1 || { tail -50 "$TMP/log"; exit 1; }
(cd "$TMP/build" && cpack -G DEB >>"$TMP/log" 2>&1) || { tail -50 "$TMP/log"; exit 1; }

VERSION=$(sed -nE 's/^project\(mailpump VERSION ([0-9.]+).*/\1/p' "$SRC/CMakeLists.txt")
DEB=$TMP/build/mailpump_${VERSION}_$(dpkg --print-architecture).deb
[ -f "$DEB" ] || { echo "package.sh: no $DEB"; ls "$TMP/build"/*.deb 2>/dev/null; exit 1; }
ok "built $(basename "$DEB")"

echo "== inspect"
[ "$(dpkg-deb -f "$DEB" Package)" = mailpump ] && [ "$(dpkg-deb -f "$DEB" Version)" = "$VERSION" ] &&
  ok "control: mailpump $VERSION" || bad control "Package/Version $(dpkg-deb -f "$DEB" Package Version)"

dpkg-deb -c "$DEB" | awk '{print $6}' | sed 's#^\./#/#' >"$TMP/files"
missing=()
for f in /usr/bin/mailpumpd /usr/bin/mailpump /usr/lib/systemd/system/mailpumpd.service \
         /etc/mailpump/mailpumpd.ini /usr/share/man/man8/mailpumpd.8 /usr/share/man/man1/mailpump.1 \
         /usr/share/man/man5/mailpumpd.ini.5 /usr/share/doc/mailpump/configuration.md \
         /usr/share/doc/mailpump/operations.md /usr/share/doc/mailpump/README.md; do
  grep -qxF "$f" "$TMP/files" || missing+=("$f")
done
[ "${#missing[@]}" = 0 ] && ok "files" || bad files "missing ${missing[*]}"
stray=$(grep -vE '^/(etc/mailpump|usr/bin|usr/lib/systemd/system|usr/share/(man/man[158]|doc/mailpump))(/|$)|^/(etc|usr|usr/lib|usr/lib/systemd|usr/share|usr/share/man|usr/share/doc)/$' "$TMP/files" || true)
[ -z "$stray" ] && ok "no stray files" || bad files "unexpected: $stray"

mkdir "$TMP/ctl"
dpkg-deb -e "$DEB" "$TMP/ctl"
[ "$(cat "$TMP/ctl/conffiles")" = /etc/mailpump/mailpumpd.ini ] && ok "conffiles" ||
  bad conffiles "$(cat "$TMP/ctl/conffiles" 2>/dev/null)"

depends=$(dpkg-deb -f "$DEB" Depends)
missing=()
for p in libc6 libc-ares2 libssl3 librabbitmq4 libhiredis libjansson4 libmicrohttpd12 libpsl5; do
  grep -qE "(^|, )$p[0-9.]* " <<<"$depends" || missing+=("$p")
done
[ "${#missing[@]}" = 0 ] && ok "depends: $depends" || bad depends "no ${missing[*]} in: $depends"

echo "== install"
if dpkg -i "$DEB" >"$TMP/dpkg.log" 2>&1; then
  installed=1
  ok "dpkg -i"
else
  installed=1
  bad install "$(cat "$TMP/dpkg.log")"
fi

if [ "$installed" = 1 ] && [ -x /usr/bin/mailpumpd ]; then
  out=$(/usr/bin/mailpumpd --check-config --config /etc/mailpump/mailpumpd.ini 2>&1) &&
    grep -q "^# configuration is valid" <<<"$out" && ok "installed mailpumpd --check-config" ||
    bad check_config "$out"
  [ "$(/usr/bin/mailpumpd --version)" = "mailpumpd $VERSION" ] && ok "mailpumpd --version" ||
    bad version "$(/usr/bin/mailpumpd --version) is not $VERSION"
  /usr/bin/mailpump --help | grep -q "^Usage: mailpump" && ok "mailpump --help" || bad help "mailpump --help"
  if command -v man >/dev/null; then
    mfail=0
    for p in 8:mailpumpd 1:mailpump 5:mailpumpd.ini; do
      w=$(man -w "${p%%:*}" "${p#*:}" 2>&1) && [[ "$w" == /usr/share/man/* ]] || { bad man "man -w $p: $w"; mfail=1; }
    done
    [ "$mfail" = 1 ] || ok "man -w mailpumpd(8) mailpump(1) mailpumpd.ini(5)"
  fi

  UNIT=/usr/lib/systemd/system/mailpumpd.service
  if command -v systemd-analyze >/dev/null; then
    out=$(systemd-analyze verify "$UNIT" 2>&1) && [ -z "$out" ] && ok "systemd-analyze verify" ||
      bad systemd_verify "$out"
  else
    echo "skip systemd-analyze verify (not installed)"
  fi
  missing=()
  for l in "DynamicUser=yes" "ProtectSystem=strict" "ProtectHome=yes" "PrivateTmp=yes" \
           "NoNewPrivileges=yes" "CapabilityBoundingSet=" "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" \
           "SystemCallFilter=@system-service" "ReadOnlyPaths=/etc/mailpump" "KillSignal=SIGTERM" \
           "Restart=on-failure" \
           "ExecStartPre=/usr/bin/mailpumpd --check-config --config /etc/mailpump/mailpumpd.ini" \
           "ExecStart=/usr/bin/mailpumpd --config /etc/mailpump/mailpumpd.ini"; do
    grep -qxF "$l" "$UNIT" || missing+=("$l")
  done
  nofile=$(sed -n 's/^LimitNOFILE=//p' "$UNIT")
  [ "${nofile:-0}" -ge 65536 ] 2>/dev/null || missing+=("LimitNOFILE>=65536 (is ${nofile:-unset})")
  [ "${#missing[@]}" = 0 ] && ok "unit hardening" || bad unit "missing: ${missing[*]}"
  stop=$(sed -nE 's/^TimeoutStopSec=([0-9]+)s?$/\1/p' "$UNIT")
  grace=$(/usr/bin/mailpumpd --check-config --config /etc/mailpump/mailpumpd.ini |
          awk '/^\[worker\]/{w=1;next} /^\[/{w=0} w && $1=="shutdown_grace_ms"{print $3}')
  if [ -n "$stop" ] && [ -n "$grace" ] && [ $((stop * 1000)) -ge $((grace + 5000)) ]; then
    ok "TimeoutStopSec=${stop}s exceeds shutdown_grace_ms=$grace by 5 s or more"
  else
    bad drain "TimeoutStopSec=${stop:-?}s, [worker] shutdown_grace_ms=${grace:-?}"
  fi
fi

echo "== purge"
if dpkg --purge mailpump >"$TMP/dpkg.log" 2>&1; then
  installed=0
  ok "dpkg --purge"
else
  bad purge "$(cat "$TMP/dpkg.log")"
fi
left=()
for f in /usr/bin/mailpumpd /usr/bin/mailpump /usr/lib/systemd/system/mailpumpd.service /etc/mailpump \
         /usr/share/man/man5/mailpumpd.ini.5 /usr/share/doc/mailpump; do
  [ ! -e "$f" ] || left+=("$f")
done
dpkg-query -W mailpump >/dev/null 2>&1 && left+=("the dpkg database entry")
[ "${#left[@]}" = 0 ] && ok "nothing left" || bad purge "left behind: ${left[*]}"

[ "$fail" = 0 ] && echo "package.sh: all checks passed" || echo "package.sh: FAILED"
exit "$fail"

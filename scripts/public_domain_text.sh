#!/usr/bin/env bash
# Writes a public-domain English text to OUT (default
# target/corpus/genesis.txt): the Book of Genesis in the King James
# Version, one verse a line, from Debian's bible-kjv-text package (read with
# the bible-kjv package's reader). Both packages are only downloaded and
# unpacked under target/corpus, never installed. Does nothing when OUT is
# there already.
set -euo pipefail
out=${1:-target/corpus/genesis.txt}
[ -s "$out" ] && exit 0
work=$(dirname "$out")/debs
mkdir -p "$work"
(cd "$work" && apt-get download -q bible-kjv bible-kjv-text >/dev/null 2>&1) || {
  echo "cannot download the bible-kjv and bible-kjv-text packages (apt-get download)" >&2
  exit 1
}
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
# `-f` prints "Ge1:1 text" per verse; the reference is cut off.
"$work/root/usr/bin/bible" -p "$work/root/usr/lib" -f 'Genesis 1:1-50:26' \
  | sed -E 's/^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ //' > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(wc -c < "$out") bytes)" >&2

#!/bin/bash
# Installs what the real-VM test needs on a Debian 12 (bookworm) x86_64 host: qemu, mmdebstrap,
# socat (run by qemu for each guest connection to the host). Idempotent; needs root or sudo.
# See docs/testing.md ("The real-VM test") and tests/vm/README.md.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
[ ${#need[@]} -gt 0 ] || exit 0

# A qemu-utils from bookworm-backports (seen: 1:10.0.2+ds-2+deb13u1~bpo12+1) Breaks bookworm's
# qemu-system-common 7.2, so the qemu-system packages must then come from backports as well.
# Without a backports entry, derive one from this machine's own bookworm entry (same URIs and
# Signed-By, only the suite differs): no mirror name is written here.
bpo=()
if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '~bpo12'; then
  bpo=(-t bookworm-backports)
  if ! apt-cache policy | grep -q 'bookworm-backports'; then
    entry=""
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      entry=$(awk '
        function flush() { if (!done && u != "" && s) { print "Types: deb"; print u;
                             print "Suites: bookworm-backports"; print "Components: main";
                             if (k != "") print k; done = 1 }
                           u = ""; k = ""; s = 0 }
        /^[ \t]*$/    { flush(); next }
        /^URIs:/      { u = $0 }
        /^Signed-By:/ { k = $0 }
        /^Suites:/    { for (i = 2; i <= NF; i++) if ($i == "bookworm") s = 1 }
        END { flush() }' "$f")
      if [ -n "$entry" ]; then
        printf '%s\n' "$entry" | $sudo_cmd tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
        break
      fi
    done
    if [ -z "$entry" ]; then
      for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        entry=$(sed -n -E 's/^(deb( \[[^]]*\])? [^ ]+) bookworm( .*)?$/\1 bookworm-backports main/p' "$f" | head -n1)
        if [ -n "$entry" ]; then
          printf '%s\n' "$entry" | $sudo_cmd tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
          break
        fi
      done
    fi
    [ -n "$entry" ] || { echo "setup-host: no bookworm entry in the apt sources" >&2; exit 1; }
  fi
fi
echo "setup-host: installing ${need[*]}" >&2
timeout 300 $sudo_cmd apt-get update -qq
timeout 600 $sudo_cmd apt-get install -y -qq --no-install-recommends "${bpo[@]}" \
  qemu-system-x86 qemu-system-common qemu-system-data seabios qemu-utils >/dev/null
timeout 600 $sudo_cmd apt-get install -y -qq --no-install-recommends \
  mmdebstrap socat e2fsprogs >/dev/null

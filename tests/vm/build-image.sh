#!/bin/bash
# Builds target/vm/image/{image.raw,vmlinuz,initrd.img}: a Debian 12 guest with cloud-init and
# systemd, booted directly by qemu (no partitions, no boot loader: root=/dev/vda).
# Cached: rebuilt only when this script changes (the stamp holds the script's hash).
# Needs root (mmdebstrap root mode, chroot in a hook). Recipe: tests/vm/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${VM_IMAGE_DIR:-target/vm/image}
STAMP=$(sha256sum tests/vm/build-image.sh | cut -c1-16)
if [ -f "$OUT/image.raw" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "build-image: cached in $OUT" >&2
  exit 0
fi
# The guest uses this machine's own Debian archive: its sources file is mmdebstrap's MIRROR
# argument (without one, mmdebstrap would use its built-in default archive instead).
SOURCES=${VM_APT_SOURCES:-}
if [ -z "$SOURCES" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [ -s "$f" ] && { SOURCES=$f; break; }
  done
fi
[ -n "$SOURCES" ] || { echo "build-image: no apt sources file found; set VM_APT_SOURCES" >&2; exit 1; }
if [ "$(id -u)" -ne 0 ]; then
  # mmdebstrap's root mode and the chroot hook need root; never prompt (tests run unattended).
  exec sudo -n VM_IMAGE_DIR="$OUT" VM_APT_SOURCES="$SOURCES" "$0"
fi
echo "build-image: building the guest image in $OUT (about a minute)" >&2
rm -rf "$OUT"
mkdir -p "$OUT"
# No Recommends, masked apt timers and NoCloud only: nothing in the guest tries the network.
timeout 1200 mmdebstrap --quiet --variant=apt \
  --include=linux-image-cloud-amd64,systemd-sysv,udev,dbus,cloud-init,ifupdown,isc-dhcp-client,iproute2,netbase,openssh-server,sudo,procps,kmod,e2fsprogs \
  --customize-hook='echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" > "$1/etc/fstab"' \
  --customize-hook='printf "datasource_list: [ NoCloud, None ]\n" > "$1/etc/cloud/cloud.cfg.d/99-datasource.cfg"' \
  --customize-hook='printf "auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n" > "$1/etc/network/interfaces"' \
  --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service' \
  --customize-hook='rm -f "$1/etc/hostname"; : > "$1/etc/machine-id"' \
  bookworm "$OUT/rootfs" "$SOURCES"
cp "$OUT"/rootfs/boot/vmlinuz-* "$OUT/vmlinuz"
cp "$OUT"/rootfs/boot/initrd.img-* "$OUT/initrd.img"
mkfs.ext4 -q -F -L root -d "$OUT/rootfs" "$OUT/image.raw" 2G
rm -rf "$OUT/rootfs"
echo "$STAMP" > "$OUT/stamp"
echo "build-image: done" >&2

#!/usr/bin/env bash
# Make the local base image for the image test (no registry can be pulled from here): a minimal Debian 12
# made with debootstrap from the apt mirror this machine uses, with the host's CA bundle (HTTPS from
# containers goes through an intercepting proxy), imported as $BASE_TAG. Cached: nothing is done when the
# image exists (FORCE=1 rebuilds it).
set -euo pipefail

BASE_TAG="${BASE_TAG:-local/bookworm:base}"
DOCKER="${DOCKER:-/usr/bin/docker}"
SUITE="${SUITE:-bookworm}"

say() { echo ">> base image: $*"; }
die() { echo "base image: $1" >&2; shift; for line in "$@"; do echo "  $line" >&2; done; exit 1; }

if [ "${FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    say "$BASE_TAG exists (cached); FORCE=1 rebuilds it"
    exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is not installed" "run: docker/ci/engine.sh install"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

MIRROR="${MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
ROOTFS="$(mktemp -d /tmp/base-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

say "debootstrap --variant=minbase $SUITE from $MIRROR (about 40 s)"
t0=$SECONDS
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || die "debootstrap failed" "$(tail -5 "$ROOTFS.log")"
rm -f "$ROOTFS.log"
say "debootstrap done in $((SECONDS - t0)) s"

# apt in the image uses the same mirror; keep the rootfs small.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
# The host's CA files, so that pip (and anything else speaking HTTPS) in a build trusts the proxy.
mkdir -p "$ROOTFS/usr/local/share/ca-certificates" "$ROOTFS/etc/ssl/certs"
cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/" 2>/dev/null || true
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
BUNDLE=/etc/ssl/certs/ca-certificates.crt

say "importing as $BASE_TAG"
tar -C "$ROOTFS" -c . | "$DOCKER" import \
    -c "ENV PIP_CERT=$BUNDLE" -c "ENV REQUESTS_CA_BUNDLE=$BUNDLE" -c "ENV SSL_CERT_FILE=$BUNDLE" \
    -c 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
say "$BASE_TAG ready ($(( ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE_TAG") + 524288) / 1048576 )) MB) in $((SECONDS - t0)) s"

#!/usr/bin/env bash
# Makes an OCI image layout from a rootfs directory with umoci (an
# independent implementation, so our unpacker is tested against real
# output), tagged "latest", with Cmd /bin/sh. With more arguments, also
# writes it as an OCI archive and a docker-archive with skopeo (offline:
# local transports only).
#
# usage: make-test-image.sh ROOTFS_DIR OUT_LAYOUT [OUT_OCI_ARCHIVE [OUT_DOCKER_ARCHIVE]]
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 4 ]; then
    sed -n '2,8p' "$0" >&2
    exit 2
fi
rootfs=$1 layout=$2 oci_archive=${3:-} docker_archive=${4:-}
for tool in umoci ${oci_archive:+skopeo}; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

tmp="$layout.tmp.$$"
cleanup() { rm -rf "$tmp" "$tmp.oci.tar" "$tmp.docker.tar"; }
trap cleanup EXIT
cleanup

rootless=()
[ "$(id -u)" = 0 ] || rootless=(--rootless)
umoci init --layout "$tmp"
umoci new --image "$tmp:latest"
umoci insert "${rootless[@]}" --image "$tmp:latest" "$rootfs" /
umoci config --image "$tmp:latest" \
    --config.cmd /bin/sh \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.workingdir / \
    --config.user 0:0 \
    --author microvm
umoci gc --layout "$tmp"
# umoci writes blobs 0600; tests run by other users read them too.
chmod -R a+rX "$tmp"

if [ -n "$oci_archive" ]; then
    skopeo --insecure-policy copy --quiet "oci:$tmp:latest" "oci-archive:$tmp.oci.tar:latest"
fi
if [ -n "$docker_archive" ]; then
    skopeo --insecure-policy copy --quiet "oci:$tmp:latest" "docker-archive:$tmp.docker.tar:busybox:latest"
fi

rm -rf "$layout"
mv "$tmp" "$layout"
[ -z "$oci_archive" ] || mv "$tmp.oci.tar" "$oci_archive"
[ -z "$docker_archive" ] || mv "$tmp.docker.tar" "$docker_archive"

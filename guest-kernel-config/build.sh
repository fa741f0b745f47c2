#!/usr/bin/env bash
# Builds the microvm guest kernel (vmlinux) from Debian's linux-source-6.1:
# `make allnoconfig` + microvm.config merged with scripts/kconfig/merge_config.sh,
# then checks that every option of the fragment really is in the final .config.
#
# The result is cached under $MICROVM_CACHE (default ~/.cache/microvm), keyed by
# a hash of the fragment, this script and the source package version, so a
# second run with the same inputs takes no time.
#
# usage: guest-kernel-config/build.sh [--out PATH]
#   Prints the path of the cached vmlinux; with --out also copies it to PATH.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/microvm.config"
cache="${MICROVM_CACHE:-$HOME/.cache/microvm}"
source_tarball=/usr/src/linux-source-6.1.tar.xz
out=""

die() { echo "guest kernel: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a path"; out="$2"; shift 2 ;;
        *) die "unknown argument '$1' (usage: build.sh [--out PATH])" ;;
    esac
done

# --- Inputs must be there before anything is built. ---
[ -f "$source_tarball" ] || die "$source_tarball is missing: install Debian's linux-source-6.1 (apt-get install linux-source-6.1)"
missing=()
for tool in make gcc flex bison bc xz perl; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -f /usr/include/libelf.h ] || missing+=("libelf-dev")
[ -f /usr/include/openssl/ssl.h ] || missing+=("libssl-dev")
[ ${#missing[@]} -eq 0 ] || die "missing build tools: ${missing[*]} (apt-get install flex bison bc libelf-dev libssl-dev build-essential xz-utils)"

source_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) \
    || die "linux-source-6.1 is not installed as a Debian package"
# The key ignores the fragment's comments and blank lines (but not its
# "# CONFIG_X is not set" lines), so documenting an option costs no rebuild.
config_lines() {
    sed -e '/^# CONFIG_[A-Za-z0-9_]* is not set$/b' -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' "$fragment"
}
key=$( { config_lines; cat "$here/build.sh"; echo "$source_version"; } | sha256sum | cut -c1-16)
result_dir="$cache/kernel/$key"
vmlinux="$result_dir/vmlinux"

finish() {
    if [ -n "$out" ]; then
        mkdir -p "$(dirname "$out")"
        cp "$vmlinux" "$out.tmp" && mv "$out.tmp" "$out"
    fi
    echo "$vmlinux"
}

if [ -f "$vmlinux" ]; then
    echo "guest kernel: cached ($key, linux-source-6.1 $source_version)" >&2
    finish
    exit 0
fi

# --- Extract the source once per source version. ---
src="$cache/src/linux-source-6.1-$source_version"
if [ ! -f "$src/.extracted" ]; then
    echo "guest kernel: extracting $source_tarball" >&2
    rm -rf "$src" && mkdir -p "$src"
    tar -xJf "$source_tarball" -C "$src" --strip-components=1
    touch "$src/.extracted"
fi

# --- Configure: allnoconfig + fragment. One build dir, so rebuilds are incremental. ---
build="$cache/kernel-build"
mkdir -p "$build"
start=$(date +%s)
echo "guest kernel: configuring in $build" >&2
(cd "$src" && ARCH=x86_64 KCONFIG_CONFIG="$build/.config" \
    scripts/kconfig/merge_config.sh -n -O "$build" "$fragment" >"$build/merge.log" 2>&1) \
    || { tail -n 30 "$build/merge.log" >&2; die "merge_config.sh failed (log: $build/merge.log)"; }

# Kconfig drops options whose dependencies are unmet without failing: check them all.
dropped=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF "$line" "$build/.config" || dropped+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$build/.config" || echo 'absent'))")
            ;;
        "# CONFIG_"*" is not set")
            name=${line#\# }; name=${name%% *}
            ! grep -q "^$name=" "$build/.config" || dropped+=("$line (got: $(grep "^$name=" "$build/.config"))")
            ;;
    esac
done <"$fragment"
if [ ${#dropped[@]} -gt 0 ]; then
    printf '  %s\n' "${dropped[@]}" >&2
    die "${#dropped[@]} option(s) of $fragment did not stick (unmet dependencies?)"
fi

# --- Build. ---
jobs=$(nproc)
echo "guest kernel: building vmlinux with $jobs jobs (log: $build/build.log)" >&2
if ! make -C "$src" O="$build" ARCH=x86_64 -j"$jobs" vmlinux >"$build/build.log" 2>&1; then
    tail -n 40 "$build/build.log" >&2
    die "kernel build failed (log: $build/build.log)"
fi
mkdir -p "$result_dir"
cp "$build/vmlinux" "$vmlinux.tmp"
cp "$build/.config" "$result_dir/config"
mv "$vmlinux.tmp" "$vmlinux"
elapsed=$(( $(date +%s) - start ))
size=$(stat -c %s "$vmlinux")
echo "guest kernel: built in ${elapsed}s, vmlinux $((size / 1024 / 1024)) MiB ($size bytes)" >&2
echo "$elapsed $size" >"$result_dir/build-stats"
finish

#!/usr/bin/env bash
# Sets microvm up on a fresh Debian 12 machine and runs the demo: installs the
# Debian packages, builds the guest kernel and every binary into build/, then
# runs `microvm run -- uname -a` in a KVM microVM (inside the KVM test host when
# this machine's /dev/kvm is PVM or missing, and says so) with the time it took.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo"
install_packages
build_all
microvm="$repo/target/debug/microvm"
demo=(sh -c 'start=$(date +%s%N); "$0" run -- uname -a; rc=$?; echo "(microvm run took $(( ($(date +%s%N) - start) / 1000000 )) ms, exit code $rc)"; exit $rc' "$microvm")
if has_hardware_kvm; then
    echo "== demo: microvm run -- uname -a"
    "${demo[@]}"
else
    echo "== demo: microvm run -- uname -a (this /dev/kvm is PVM or missing: running inside the KVM test host)"
    "$repo/target/debug/testhost" with -- "$repo/target/debug/testhost" run -- "${demo[@]}"
fi

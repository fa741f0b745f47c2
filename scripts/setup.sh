#!/usr/bin/env bash
# Sets microvm up on a fresh Debian 12 machine and runs the demo: installs the
# Debian packages, builds the guest kernel and every binary into build/, then
# boots the guest kernel to a probe init in a KVM microVM (inside the KVM test
# host when this machine's /dev/kvm is PVM or missing) and prints how long it took.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo"
install_packages
build_all
echo "== demo: boot the guest kernel to its probe init"
"$repo/target/debug/testhost" probe --runs 3

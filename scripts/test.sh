#!/usr/bin/env bash
# Runs the whole test suite: checks formatting and lints (cargo fmt,
# clippy with the workspace's [lints]), installs and builds what is missing
# (as scripts/setup.sh does), then runs `cargo test` with one KVM test host booted
# for the whole run when this machine's /dev/kvm is PVM or missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo"
echo "== cargo fmt --check"
cargo fmt --all --check
install_packages
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --workspace --all-targets -- -D warnings
build_all
# The fuzz targets of the guest-facing devices, briefly (docs/fuzzing.md).
"$repo/scripts/fuzz.sh" --short
echo "== tests"
if has_hardware_kvm; then
    cargo test --workspace
else
    "$repo/target/debug/testhost" with -- cargo test --workspace
fi

#!/usr/bin/env bash
# Runs the fuzz targets of the VMM's guest-facing devices (vmm/fuzz:
# cargo-fuzz and libFuzzer on the stable toolchain; see docs/fuzzing.md).
#
#   scripts/fuzz.sh [--short | --long | --seconds S | --runs N] [TARGET...]
#
#   --short      CI: 20 s per target (the build is cargo's incremental one)
#   --long       10^6 executions per target (about 2 hours in all here: see
#                docs/fuzzing.md)
#   --seconds S  S seconds per target (the default: 60)
#   --runs N     N executions per target
#   TARGET       mmio, vsock, net, fs (default: all four)
#
# Each target grows its corpus in vmm/fuzz/corpus/TARGET (not committed),
# plus the seeds in vmm/fuzz/seeds/TARGET if any. A crash, leak, timeout
# or out-of-memory input is saved in vmm/fuzz/artifacts/TARGET and fails
# the run; replay one with
#   ~/.cache/microvm/fuzz-target/x86_64-unknown-linux-gnu/release/TARGET FILE
# and turn it into a unit test in vmm/src/fuzzing/tests.rs.
#
# Run as root, the targets run as nobody (setpriv): the fs target serves a
# scratch directory through the FUSE server, and a bug found there must not
# be able to write anywhere a root process can.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

all_targets=(mmio vsock net fs)
limit=(-max_total_time=60)
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --short) limit=(-max_total_time=20) ;;
        --long) limit=(-runs=1000000) ;;
        --seconds) limit=("-max_total_time=$2"); shift ;;
        --runs) limit=("-runs=$2"); shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        mmio|vsock|net|fs) targets+=("$1") ;;
        *) echo "fuzz.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

install_cargo_fuzz
fuzz_dir="$repo/vmm/fuzz"
echo "== fuzz targets: building"
# libFuzzer's instrumentation flags are unstable options of rustc:
# RUSTC_BOOTSTRAP lets the stable toolchain take them. Debug assertions on,
# so arithmetic overflows are crashes too.
# The build lives in the cache (MICROVM_CACHE, as the guest kernel's), so a
# fresh clone rebuilds only our crates, not every dependency (about 10 min
# on 2 cores) under the sanitizer.
fuzz_target_dir="${MICROVM_CACHE:-$HOME/.cache/microvm}/fuzz-target"
(cd "$fuzz_dir" && RUSTC_BOOTSTRAP=1 cargo fuzz build --debug-assertions \
    --target-dir "$fuzz_target_dir" 2>&1 \
    | { grep -Ev '^\s*(Compiling|Finished|Building|Running)' || true; })
bin_dir="$fuzz_target_dir/x86_64-unknown-linux-gnu/release"

# Where the targets run: binaries, corpus and artifacts copied into a
# scratch tree the unprivileged user owns; their scratch files on tmpfs.
scratch=$(mktemp -d)
shm_scratch=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch" "$shm_scratch"' EXIT
run_as=()
if [ "$(id -u)" = 0 ]; then
    run_as=(setpriv --reuid=65534 --regid=65534 --clear-groups --)
    chown 65534:65534 "$scratch" "$shm_scratch"
fi
chmod 0755 "$scratch"

failed=()
for target in "${targets[@]}"; do
    work="$scratch/$target"
    mkdir -p "$work/corpus" "$work/artifacts" "$fuzz_dir/corpus/$target"
    cp "$bin_dir/$target" "$work/"
    cp -r "$fuzz_dir/corpus/$target/." "$work/corpus/"
    if [ -d "$fuzz_dir/seeds/$target" ]; then cp -r "$fuzz_dir/seeds/$target/." "$work/corpus/"; fi
    [ "$(id -u)" != 0 ] || chown -R 65534:65534 "$work"
    echo "== fuzz target $target (${limit[*]})"
    status=0
    (cd "$work" && TMPDIR="$shm_scratch" "${run_as[@]}" "./$target" \
        -rss_limit_mb=1536 -malloc_limit_mb=256 -timeout=10 -max_len=4096 \
        -print_final_stats=1 -artifact_prefix=artifacts/ "${limit[@]}" corpus) \
        >"$work/log" 2>&1 || status=$?
    cp -rn "$work/corpus/." "$fuzz_dir/corpus/$target/" || true
    stats=$(grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$work/log" | tr '\n' ' ')
    corpus=$(find "$fuzz_dir/corpus/$target" -type f | wc -l)
    echo "   $stats corpus: $corpus inputs"
    if [ "$status" != 0 ]; then
        mkdir -p "$fuzz_dir/artifacts/$target"
        cp -r "$work/artifacts/." "$fuzz_dir/artifacts/$target/"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written|artifact' "$work/log" | head -20 >&2 || true
        tail -40 "$work/log" >"$fuzz_dir/artifacts/$target/last-log.txt"
        echo "   FAILED (exit $status): input(s) in vmm/fuzz/artifacts/$target" >&2
        failed+=("$target")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: $(( ${#targets[@]} - ${#failed[@]} )) passed, ${#failed[@]} failed (${failed[*]})" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"

# Shared by scripts/setup.sh and scripts/test.sh: install what microvm needs
# from Debian and build every artifact into build/.
# shellcheck shell=bash

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir="$repo/build"

# Debian packages: the guest kernel's source and tools to build it, the
# test host's kernel, QEMU, busybox for guest images, kmod for module lookup.
packages=(
    linux-source-6.1 flex bison bc libelf-dev libssl-dev build-essential xz-utils
    linux-image-amd64 kmod qemu-system-x86 busybox-static
    # runc: the reference the container tests compare the agent with.
    runc
    # umoci, skopeo: make the busybox test image (OCI layout and archives).
    umoci skopeo
    # containerd (ctr, CRI), CNI plugins and protoc (the tests' CRI client is
    # generated from the cri-api proto): the containerd tests and benchmark.
    containerd protobuf-compiler containernetworking-plugins
)

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    local missing=()
    for package in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # The test host loads modules by name: make sure they are indexed.
    local release
    for image in /boot/vmlinuz-*; do
        release=${image#/boot/vmlinuz-}
        [ -f "/lib/modules/$release/modules.dep" ] || as_root depmod "$release"
    done
}

# cargo-fuzz drives the fuzz targets (scripts/fuzz.sh); installed from
# crates.io into ~/.cargo/bin when missing.
cargo_fuzz_version=0.13.2
install_cargo_fuzz() {
    if ! command -v cargo-fuzz >/dev/null 2>&1; then
        echo "== installing cargo-fuzz $cargo_fuzz_version"
        cargo install --locked --quiet --version "$cargo_fuzz_version" cargo-fuzz
    fi
}

build_all() {
    mkdir -p "$build_dir"
    echo "== guest kernel"
    "$repo/guest-kernel-config/build.sh" --out "$build_dir/vmlinux" >/dev/null

    echo "== static guest binaries (microvm-agent, testhost-init, probe-init)"
    # An explicit --target keeps +crt-static away from build scripts and proc macros.
    # Stripped and built for size (profile "guest": LTO, opt-level s; 5.1
    # instead of 6.9 MB for the agent): the guest unpacks the initramfs at
    # every boot and keeps it in its RAM.
    RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" cargo build --quiet --profile guest \
        --target x86_64-unknown-linux-gnu \
        -p agent --bin microvm-agent \
        -p microvm-tests --bin testhost-init --bin netbench --bin hostile -p rootfs-builder --bin probe-init
    local static="$repo/target/x86_64-unknown-linux-gnu/guest"
    cp "$static/microvm-agent" "$static/testhost-init" "$static/netbench" "$static/hostile" \
        "$static/probe-init" "$build_dir/"

    echo "== host tools"
    cargo build --quiet --workspace --bins
    "$repo/target/debug/rootfs-builder" initramfs \
        --init "$build_dir/probe-init" --out "$build_dir/probe-initramfs.cpio" >/dev/null
    echo "== guest initramfs (the agent as /init, busybox)"
    "$repo/target/debug/rootfs-builder" initramfs --init "$build_dir/microvm-agent" \
        --busybox /bin/busybox --out "$build_dir/microvm-initramfs.cpio" >/dev/null

    # The default container rootfs and the busybox test image, rebuilt only
    # when busybox or their recipe changed (umoci stamps times, so each
    # rebuild changes the image's digests).
    local image_key
    image_key=$(cat /bin/busybox "$repo/rootfs-builder/src/default_rootfs.rs" \
        "$repo/rootfs-builder/make-test-image.sh" | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$build_dir/busybox-images.stamp" 2>/dev/null)" != "$image_key" ] \
        || [ ! -d "$build_dir/busybox-rootfs" ] || [ ! -f "$build_dir/busybox-oci/index.json" ] \
        || [ ! -f "$build_dir/busybox-oci.tar" ] || [ ! -f "$build_dir/busybox-docker.tar" ]; then
        echo "== default container rootfs and busybox test image (build/busybox-rootfs, build/busybox-oci)"
        rm -f "$build_dir/busybox-images.stamp"
        "$repo/target/debug/rootfs-builder" busybox-rootfs --busybox /bin/busybox \
            --out "$build_dir/busybox-rootfs" >/dev/null
        "$repo/rootfs-builder/make-test-image.sh" "$build_dir/busybox-rootfs" \
            "$build_dir/busybox-oci" "$build_dir/busybox-oci.tar" "$build_dir/busybox-docker.tar"
        echo "$image_key" >"$build_dir/busybox-images.stamp"
    fi
}

# True when /dev/kvm is hardware KVM (VMX/SVM); false when it is PVM or missing,
# where VMs run inside the KVM test host instead.
has_hardware_kvm() {
    grep -qE '^flags.*\b(vmx|svm)\b' /proc/cpuinfo && [ -e /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]
}

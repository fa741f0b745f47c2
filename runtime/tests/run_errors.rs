//! `microvm run`'s common failures that need no VM (and no KVM): a missing
//! image, kernel, rootfs or bundle, a bad `--memory`, no KVM device. Each
//! must end the run with a non-zero status and one message on stderr that
//! names what was wrong and shows each cause once.
//!
//! The guest assets are stand-ins (empty files): every case fails before a
//! guest could boot. The VMM is the real one (`target/debug/microvm-vmm`),
//! for the failures only it sees; it is pointed at a KVM device that does
//! not exist, so nothing here ever touches `/dev/kvm`.

// Test code: an unwrap is the assertion "this must not fail".
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MICROVM: &str = env!("CARGO_BIN_EXE_microvm");
const ENOENT: &str = "No such file or directory";

/// Stand-in assets in a directory of their own.
struct Assets {
    dir: tempfile::TempDir,
}

impl Assets {
    fn new() -> Assets {
        let dir = tempfile::tempdir().unwrap();
        for file in ["vmlinux", "initramfs.cpio"] {
            std::fs::write(dir.path().join(file), b"not a real one").unwrap();
        }
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        Assets { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `microvm run ARGS` with the stand-in assets, `env` set over them.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(MICROVM);
        command
            .arg("run")
            .args(args)
            .env("MICROVM_KERNEL", self.path("vmlinux"))
            .env("MICROVM_INITRD", self.path("initramfs.cpio"))
            .env("MICROVM_ROOTFS", self.path("rootfs"))
            .env("MICROVM_VMM", vmm())
            .env("MICROVM_KVM_DEVICE", "/nonexistent/kvm")
            .env("TMPDIR", self.path("tmp"))
            .env_remove("MICROVM_LOG");
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().unwrap()
    }
}

/// The VMM built next to `microvm`.
fn vmm() -> PathBuf {
    let path = Path::new(MICROVM).with_file_name("microvm-vmm");
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo build -p vmm)",
        path.display()
    );
    path
}

/// Checks one failure: non-zero exit, each of `names` on stderr, no cause
/// shown twice. Returns stderr.
fn assert_fails_naming(what: &str, out: &Output, names: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    eprintln!("{what}: {stderr}");
    assert!(
        !out.status.success(),
        "{what}: exited {:?}; stderr: {stderr}",
        out.status
    );
    assert!(stderr.starts_with("microvm: "), "{what}: {stderr}");
    for name in names {
        assert!(
            stderr.contains(name),
            "{what}: the message does not name {name:?}: {stderr}"
        );
    }
    if let Some(repeated) = protocols::repeated_cause(&stderr) {
        panic!("{what}: the message shows {repeated:?} twice: {stderr}");
    }
    stderr
}

#[test]
fn a_missing_image_is_named_with_its_cause_once() {
    let assets = Assets::new();
    let out = assets.run(&["--image", "/no/such.tar", "--", "true"], &[]);
    let stderr = assert_fails_naming("--image /no/such.tar", &out, &["/no/such.tar", ENOENT]);
    assert_eq!(stderr.matches(ENOENT).count(), 1, "{stderr}");
}

#[test]
fn an_image_that_is_no_image_is_named() {
    let assets = Assets::new();
    let not_an_image = assets.path("vmlinux").display().to_string();
    let out = assets.run(&["--image", &not_an_image, "--", "true"], &[]);
    assert_fails_naming("--image FILE", &out, &[&not_an_image]);
}

#[test]
fn a_broken_image_is_named_with_its_cause_once() {
    let assets = Assets::new();
    let image = assets.path("image");
    std::fs::create_dir(&image).unwrap();
    std::fs::write(
        image.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(image.join("index.json"), b"{ not json").unwrap();
    let image = image.display().to_string();
    let out = assets.run(&["--image", &image, "--", "true"], &[]);
    assert_fails_naming("--image BROKEN", &out, &[&image, "index.json"]);
}

#[test]
fn a_vmm_that_cannot_be_started_is_named_with_its_cause_once() {
    let assets = Assets::new();
    // Not executable, even for root.
    let vmm = assets.path("initramfs.cpio").display().to_string();
    let out = assets.run(&["--", "true"], &[("MICROVM_VMM", &vmm)]);
    assert_fails_naming("MICROVM_VMM=FILE", &out, &[&vmm, "Permission denied"]);
}

#[test]
fn a_missing_kernel_is_named() {
    let assets = Assets::new();
    let out = assets.run(&["--kernel", "/no/vmlinux", "--", "true"], &[]);
    assert_fails_naming("--kernel /no/vmlinux", &out, &["/no/vmlinux"]);
    let out = assets.run(&["--", "true"], &[("MICROVM_KERNEL", "/no/vmlinux")]);
    assert_fails_naming("MICROVM_KERNEL=/no/vmlinux", &out, &["/no/vmlinux"]);
    let out = assets.run(&["--initrd", "/no/initrd.cpio", "--", "true"], &[]);
    assert_fails_naming("--initrd /no/initrd.cpio", &out, &["/no/initrd.cpio"]);
}

#[test]
fn a_bad_memory_size_is_named() {
    let assets = Assets::new();
    let out = assets.run(&["--memory", "lots", "--", "true"], &[]);
    assert_fails_naming("--memory lots", &out, &["--memory lots"]);
    let out = assets.run(&["--memory", "-5", "--", "true"], &[]);
    assert_fails_naming("--memory -5", &out, &["--memory -5"]);
    // The VMM refuses it.
    let out = assets.run(&["--memory", "0", "--", "true"], &[]);
    assert_fails_naming("--memory 0", &out, &["0 MiB", "at least 16"]);
    let out = assets.run(&["--cpus", "many", "--", "true"], &[]);
    assert_fails_naming("--cpus many", &out, &["--cpus many"]);
}

#[test]
fn a_missing_kvm_device_is_named() {
    let assets = Assets::new();
    let out = assets.run(&["--", "true"], &[]);
    assert_fails_naming(
        "no KVM device",
        &out,
        &["/nonexistent/kvm does not exist", "KVM is not available"],
    );
}

#[test]
fn a_missing_rootfs_or_bundle_is_named() {
    let assets = Assets::new();
    let out = assets.run(&["--rootfs", "/no/rootfs", "--", "true"], &[]);
    assert_fails_naming("--rootfs /no/rootfs", &out, &["/no/rootfs"]);
    let out = assets.run(&["--bundle", "/no/bundle"], &[]);
    assert_fails_naming("--bundle /no/bundle", &out, &["/no/bundle"]);
    // A bundle directory without its config.json.
    let bundle = assets.path("rootfs").display().to_string();
    let out = assets.run(&["--bundle", &bundle], &[]);
    assert_fails_naming("--bundle DIR", &out, &[&format!("{bundle}/config.json")]);
}

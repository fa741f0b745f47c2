//! Our unpacker against images made by independent tools: umoci builds the
//! layouts (with its own whiteouts), skopeo the OCI and docker archives.
//! Both are Debian packages that scripts/setup.sh installs; a missing one
//! fails these tests with the reason rather than skipping them.

// Test code: an unwrap is the assertion "this must not fail".
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::tree;
use rootfs_builder::image::{Format, Image};

fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is missing: apt-get install {tool} (scripts/setup.sh does)"
    );
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// build/busybox-oci and its archives when `build_all` made them; else the
/// same, made here.
fn busybox_images(scratch: &Path) -> Vec<(PathBuf, Format)> {
    let build = repo().join("build");
    let mut paths = (
        build.join("busybox-oci"),
        build.join("busybox-oci.tar"),
        build.join("busybox-docker.tar"),
    );
    if !(paths.0.join("index.json").exists() && paths.1.exists() && paths.2.exists()) {
        require("umoci");
        require("skopeo");
        let rootfs = scratch.join("rootfs");
        rootfs_builder::default_rootfs::build(Path::new("/bin/busybox"), &rootfs).unwrap();
        paths = (
            scratch.join("busybox-oci"),
            scratch.join("busybox-oci.tar"),
            scratch.join("busybox-docker.tar"),
        );
        run(
            Command::new(repo().join("rootfs-builder/make-test-image.sh"))
                .arg(&rootfs)
                .arg(&paths.0)
                .arg(&paths.1)
                .arg(&paths.2),
        );
    }
    vec![
        (paths.0, Format::OciLayout),
        (paths.1, Format::OciArchive),
        (paths.2, Format::DockerArchive),
    ]
}

#[test]
fn umoci_busybox_image_unpacks_in_every_format() {
    let scratch = tempfile::tempdir().unwrap();
    let mut trees = Vec::new();
    for (path, format) in busybox_images(scratch.path()) {
        let image = Image::open(&path, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(image.format(), format, "{}", path.display());
        assert_eq!(image.config().cmd, ["/bin/sh"]);
        assert_eq!(image.config().working_dir, "/");
        assert_eq!(image.config().user, "0:0");
        let out = tempfile::tempdir().unwrap();
        let rootfs = out.path().join("rootfs");
        image.unpack_to(&rootfs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            std::fs::read_link(rootfs.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(std::fs::metadata(rootfs.join("bin/busybox")).unwrap().len() > 100_000);
        assert!(std::fs::read_to_string(rootfs.join("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0:"));
        trees.push(tree(&rootfs));
    }
    assert_eq!(trees[0], trees[1]);
    assert_eq!(trees[0], trees[2]);
}

#[test]
fn umoci_whiteouts_and_opaque_inserts() {
    require("umoci");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    for (path, content) in [
        ("a/keep", "keep"),
        ("a/gone", "gone"),
        ("b/old", "old"),
        ("c/x", "x"),
    ] {
        let path = base.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let replacement = dir.path().join("newb");
    std::fs::create_dir_all(&replacement).unwrap();
    std::fs::write(replacement.join("new"), "new").unwrap();

    let layout = dir.path().join("layout");
    let image = format!("{}:latest", layout.display());
    let rootless: &[&str] = if common::is_root() {
        &[]
    } else {
        &["--rootless"]
    };
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .arg("insert")
        .args(rootless)
        .args(["--image", &image])
        .arg(&base)
        .arg("/"));
    run(Command::new("umoci").arg("insert").args(rootless).args([
        "--image",
        &image,
        "--whiteout",
        "/a/gone",
    ]));
    run(Command::new("umoci").arg("insert").args(rootless).args([
        "--image",
        &image,
        "--whiteout",
        "/c",
    ]));
    run(Command::new("umoci")
        .arg("insert")
        .args(rootless)
        .args(["--image", &image, "--opaque"])
        .arg(&replacement)
        .arg("/b"));

    let image = Image::open(&layout, Some("latest")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(image.layer_count(), 4);
    let out = dir.path().join("out");
    image.unpack_to(&out).unwrap_or_else(|e| panic!("{e}"));
    let paths: Vec<String> = tree(&out).into_keys().collect();
    assert_eq!(paths, ["a", "a/keep", "b", "b/new"]);
}

//! Image unpacking against images built here with the `tar` crate: layer
//! semantics, refusal of hostile entries, verification, formats, the cache.

// Test code: an unwrap is the assertion "this must not fail".
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use rootfs_builder::image::{prepare, Format, Image, ImageError, Overrides};

fn unpack_err(image: &Path) -> (ImageError, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("rootfs");
    let err = Image::open(image, None)
        .and_then(|img| img.unpack_to(&target))
        .expect_err("unpack should fail");
    eprintln!("error: {err}");
    // A failed unpack leaves nothing behind, not even a temporary directory.
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "partial unpack left behind after: {err}"
    );
    (err, out)
}

fn layout_of(tars: &[Vec<u8>], compression: Compression) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    oci_layout(dir.path(), tars, compression);
    dir
}

fn unpack_ok(image: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let img = Image::open(image, None).unwrap();
    img.unpack_to(&out.path().join("rootfs")).unwrap();
    out
}

#[test]
fn whiteouts_and_opaque_directories() {
    let lower = Layer::new()
        .dir("a", 0o755)
        .file("a/keep", b"keep", 0o644)
        .file("a/gone", b"gone", 0o644)
        .dir("b", 0o755)
        .file("b/old", b"old", 0o644)
        .dir("b/sub", 0o755)
        .file("b/sub/old2", b"old2", 0o644)
        .file("c", b"c", 0o644)
        .dir("d", 0o755)
        .file("d/x", b"x", 0o644)
        .dir("e", 0o755)
        .dir("e/f", 0o755)
        .file("e/f/lower", b"lower", 0o644)
        .tar();
    let upper = Layer::new()
        .marker("a/.wh.gone")
        .marker(".wh.c")
        .marker(".wh.never-existed")
        .dir("b", 0o755)
        .file("b/new", b"new", 0o644)
        // Opaque after a sibling of this layer: the sibling stays.
        .marker("b/.wh..wh..opq")
        .marker("d/.wh..wh..opq")
        // A file below a kept subdirectory of an opaque dir.
        .file("e/f/upper", b"upper", 0o644)
        .marker("e/.wh..wh..opq")
        .tar();
    let layout = layout_of(&[lower, upper], Compression::Gzip);
    let out = unpack_ok(layout.path());
    let t = tree(&out.path().join("rootfs"));
    let paths: Vec<&str> = t.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        ["a", "a/keep", "b", "b/new", "d", "e", "e/f", "e/f/upper"],
        "{t:#?}"
    );
}

#[test]
fn whiteout_then_recreate_in_a_later_layer() {
    let l1 = Layer::new().dir("x", 0o700).file("x/1", b"1", 0o644).tar();
    let l2 = Layer::new().marker(".wh.x").tar();
    let l3 = Layer::new().file("x/2", b"2", 0o644).tar();
    let layout = layout_of(&[l1, l2, l3], Compression::None);
    let out = unpack_ok(layout.path());
    let root = out.path().join("rootfs");
    assert!(!root.join("x/1").exists());
    assert!(root.join("x/2").exists());
    // The recreated directory does not inherit the deleted one's mode.
    assert_eq!(
        std::fs::metadata(root.join("x"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
}

#[test]
fn hard_links_share_an_inode() {
    let layer = Layer::new()
        .dir("bin", 0o755)
        .file("bin/tool", b"#!/bin/sh\n", 0o755)
        .hardlink("bin/alias", "bin/tool")
        .hardlink("alias2", "./bin/tool")
        .tar();
    let layout = layout_of(&[layer], Compression::Gzip);
    let out = unpack_ok(layout.path());
    let root = out.path().join("rootfs");
    let a = std::fs::metadata(root.join("bin/tool")).unwrap();
    let b = std::fs::metadata(root.join("bin/alias")).unwrap();
    let c = std::fs::metadata(root.join("alias2")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.ino(), c.ino());
    assert_eq!(a.nlink(), 3);
    assert_eq!(
        std::fs::read(root.join("bin/alias")).unwrap(),
        b"#!/bin/sh\n"
    );
}

#[test]
fn hard_link_to_a_missing_file_is_an_error() {
    let layer = Layer::new().hardlink("x", "nope").tar();
    let layout = layout_of(&[layer], Compression::None);
    let (err, _) = unpack_err(layout.path());
    let msg = err.to_string();
    assert!(
        msg.contains("\"x\"") && msg.contains("nope") && msg.contains("does not exist"),
        "{msg}"
    );
}

#[test]
fn absolute_symlink_escape_is_refused() {
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    let layer = Layer::new()
        .symlink("escape", "/")
        .file("escape/etc/passwd", b"pwned::0:0::/:/bin/sh\n", 0o644)
        .tar();
    let layout = layout_of(&[layer], Compression::None);
    let (err, _) = unpack_err(layout.path());
    let msg = err.to_string();
    assert!(
        msg.contains("escape/etc/passwd") && msg.contains("escape is a symlink"),
        "{msg}"
    );
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
}

#[test]
fn symlink_escapes_to_an_outside_directory_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let outside_path = outside.path().display().to_string();
    // Absolute, relative, and across layers; a symlinked directory used as
    // a parent by a later layer; a hard link through a symlink.
    let cases: Vec<Vec<Vec<u8>>> = vec![
        vec![Layer::new()
            .symlink("out", &outside_path)
            .file("out/pwned", b"x", 0o644)
            .tar()],
        vec![Layer::new()
            .dir("a", 0o755)
            .symlink("a/up", "../../../../../../../../../..")
            .file("a/up/tmp/pwned", b"x", 0o644)
            .tar()],
        vec![
            Layer::new().symlink("out", &outside_path).tar(),
            Layer::new().dir("out/sub", 0o755).tar(),
        ],
        vec![
            Layer::new().symlink("out", &outside_path).tar(),
            Layer::new().marker("out/.wh.victim").tar(),
        ],
        vec![Layer::new()
            .symlink("etc", "/etc")
            .hardlink("stolen", "etc/passwd")
            .tar()],
    ];
    std::fs::write(outside.path().join("victim"), b"still here").unwrap();
    for (i, layers) in cases.iter().enumerate() {
        let layout = layout_of(layers, Compression::Gzip);
        let (err, _) = unpack_err(layout.path());
        assert!(
            matches!(err, ImageError::Entry { .. }),
            "case {i}: unexpected error {err}"
        );
        assert!(err.to_string().contains("symlink"), "case {i}: {err}");
        let names: Vec<_> = std::fs::read_dir(outside.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["victim"], "case {i} wrote outside");
    }
    assert_eq!(
        std::fs::read(outside.path().join("victim")).unwrap(),
        b"still here"
    );
}

#[test]
fn a_file_replaces_a_symlink_instead_of_writing_through_it() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"original").unwrap();
    let l1 = Layer::new()
        .symlink("f", &victim.display().to_string())
        .tar();
    let l2 = Layer::new().file("f", b"replaced", 0o600).tar();
    let layout = layout_of(&[l1, l2], Compression::None);
    let out = unpack_ok(layout.path());
    let f = out.path().join("rootfs/f");
    assert!(std::fs::symlink_metadata(&f).unwrap().is_file());
    assert_eq!(std::fs::read(&f).unwrap(), b"replaced");
    assert_eq!(std::fs::read(&victim).unwrap(), b"original");
    // Whiting out a symlink removes the link, never its target.
    let l3 = Layer::new()
        .symlink("g", &victim.display().to_string())
        .tar();
    let l4 = Layer::new().marker(".wh.g").tar();
    let layout = layout_of(&[l3, l4], Compression::None);
    let out = unpack_ok(layout.path());
    assert!(std::fs::symlink_metadata(out.path().join("rootfs/g")).is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"original");
}

#[test]
fn dot_dot_and_absolute_entries_are_refused() {
    let parent = tempfile::tempdir().unwrap();
    for name in [
        "../evil",
        "a/../../evil",
        "./../evil",
        "/etc/evil-from-test",
    ] {
        let layer = Layer::new()
            .dir("a", 0o755)
            .file(name, b"evil", 0o644)
            .tar();
        let layout = layout_of(&[layer], Compression::None);
        let (err, out) = unpack_err(layout.path());
        let msg = err.to_string();
        assert!(msg.contains(name), "{msg}");
        assert!(msg.contains("..") || msg.contains("absolute"), "{msg}");
        assert!(!out.path().join("evil").exists());
        assert!(!out.path().parent().unwrap().join("evil").exists());
        assert!(!Path::new("/etc/evil-from-test").exists());
    }
    // Hard link targets too.
    let layer = Layer::new().hardlink("x", "../../etc/passwd").tar();
    let layout = layout_of(&[layer], Compression::None);
    let (err, _) = unpack_err(layout.path());
    assert!(err.to_string().contains("hard link target"), "{err}");
    drop(parent);
}

#[test]
fn modes_times_owners_and_special_files() {
    let layer = Layer::new()
        .dir("ro", 0o555)
        .file("ro/inside", b"x", 0o444)
        .file("suid", b"x", 0o4755)
        .file_owned("owned", b"x", 0o640, 1234, 5678)
        .symlink("link", "owned")
        .fifo("pipe")
        .char_device("null", 1, 3)
        .tar();
    let layout = layout_of(&[layer], Compression::Gzip);
    let out = unpack_ok(layout.path());
    let root = out.path().join("rootfs");
    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(mode("ro/inside"), 0o444);
    assert_eq!(mode("suid"), 0o4755);
    assert_eq!(mode("owned"), 0o640);
    for p in ["ro", "ro/inside", "owned", "link", "pipe"] {
        assert_eq!(
            std::fs::symlink_metadata(root.join(p)).unwrap().mtime(),
            MTIME as i64,
            "{p}"
        );
    }
    assert_eq!(
        std::fs::read_link(root.join("link")).unwrap(),
        Path::new("owned")
    );
    assert!(std::fs::symlink_metadata(root.join("pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    if is_root() {
        let owned = std::fs::metadata(root.join("owned")).unwrap();
        assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
        let null = std::fs::symlink_metadata(root.join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    } else {
        assert!(!root.join("null").exists(), "devices need root");
    }
}

#[test]
fn truncated_layers_are_errors() {
    let content = vec![7u8; 10_000];
    let layer = Layer::new().file("big", &content, 0o644).tar();

    // The blob is shorter than its descriptor says.
    let layout = layout_of(std::slice::from_ref(&layer), Compression::Gzip);
    let blob = layer_blob(layout.path(), 0);
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
    let (err, _) = unpack_err(layout.path());
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("layer 1/1 (sha256:"), "{err}");

    // A truncated tar whose descriptor matches it (a bad image, not a bad copy).
    let cut = layer[..512 + 4000].to_vec();
    let dir = tempfile::tempdir().unwrap();
    let (config_digest, config_size) = write_blob(
        dir.path(),
        &config_json(std::slice::from_ref(&layer), "amd64"),
    );
    let (layer_digest, layer_size) = write_blob(dir.path(), &cut);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    }))
    .unwrap();
    let (digest, size) = write_blob(dir.path(), &manifest);
    write_index(
        dir.path(),
        vec![
            serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size}),
        ],
    );
    let (err, _) = unpack_err(dir.path());
    let msg = err.to_string();
    assert!(
        msg.contains("\"big\"") && msg.contains("truncated"),
        "{msg}"
    );

    // A truncated gzip stream with a matching descriptor.
    let gz = compress(&layer, Compression::Gzip);
    let cut = &gz[..gz.len() - 20];
    let blob = layer_blob(layout.path(), 0);
    std::fs::write(&blob, cut).unwrap();
    // Patch the manifest's size and digest of that layer: rebuild the layout.
    let dir = tempfile::tempdir().unwrap();
    let (config_digest, config_size) = write_blob(
        dir.path(),
        &config_json(std::slice::from_ref(&layer), "amd64"),
    );
    let (layer_digest, layer_size) = write_blob(dir.path(), cut);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    }))
    .unwrap();
    let (digest, size) = write_blob(dir.path(), &manifest);
    write_index(
        dir.path(),
        vec![
            serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size}),
        ],
    );
    let (err, _) = unpack_err(dir.path());
    assert!(matches!(err, ImageError::LayerStream { .. }), "{err}");
}

#[test]
fn truncated_archive_is_an_error() {
    let layer = Layer::new().file("big", &vec![1u8; 50_000], 0o644).tar();
    let layout = layout_of(&[layer], Compression::None);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    oci_archive(layout.path(), &archive);
    let bytes = std::fs::read(&archive).unwrap();
    // Cut in the middle of the archive, wherever that falls.
    for cut in [bytes.len() / 2, bytes.len() - 2000, 1000] {
        std::fs::write(&archive, &bytes[..cut]).unwrap();
        let (err, _) = unpack_err(&archive);
        let msg = err.to_string();
        assert!(msg.contains("image.tar"), "{msg}");
        assert!(
            matches!(
                err,
                ImageError::TruncatedArchive { .. }
                    | ImageError::Missing { .. }
                    | ImageError::UnknownFormat { .. }
            ),
            "cut at {cut}: {msg}"
        );
    }
}

#[test]
fn bad_digests_and_missing_blobs_are_errors() {
    let layer = Layer::new().file("f", b"hello", 0o644).tar();
    let layout = layout_of(std::slice::from_ref(&layer), Compression::None);
    let blob = layer_blob(layout.path(), 0);
    let digest = format!("sha256:{}", blob.file_name().unwrap().to_str().unwrap());
    let mut bytes = std::fs::read(&blob).unwrap();
    let pos = bytes.windows(5).position(|w| w == b"hello").unwrap();
    bytes[pos] = b'j';
    std::fs::write(&blob, &bytes).unwrap();
    let (err, _) = unpack_err(layout.path());
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&digest), "{err}");

    // A corrupted config (its descriptor's digest no longer matches).
    let layout = layout_of(std::slice::from_ref(&layer), Compression::None);
    let config = config_json(std::slice::from_ref(&layer), "amd64");
    let config_path = layout
        .path()
        .join("blobs/sha256")
        .join(hex(&sha256(&config)));
    let mut tampered = std::fs::read(&config_path).unwrap();
    let pos = tampered.windows(4).position(|w| w == b"/srv").unwrap();
    tampered[pos + 1] = b'S';
    std::fs::write(&config_path, &tampered).unwrap();
    let err = Image::open(layout.path(), None)
        .err()
        .expect("tampered config");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("image config"), "{err}");

    // A missing layer blob.
    let layout = layout_of(std::slice::from_ref(&layer), Compression::None);
    let blob = layer_blob(layout.path(), 0);
    std::fs::remove_file(&blob).unwrap();
    let (err, _) = unpack_err(layout.path());
    assert!(matches!(err, ImageError::Missing { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(blob.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );

    // A layer whose content is not what the config's diff_id says.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("docker.tar");
    docker_archive(&archive, std::slice::from_ref(&layer), "test:latest");
    let other = Layer::new().file("f", b"other", 0o644).tar();
    let mut bytes = std::fs::read(&archive).unwrap();
    let pos = bytes
        .windows(layer.len())
        .position(|w| w == layer.as_slice())
        .unwrap();
    bytes[pos..pos + other.len()].copy_from_slice(&other);
    std::fs::write(&archive, &bytes).unwrap();
    let (err, _) = unpack_err(&archive);
    assert!(err.to_string().contains("diff_id"), "{err}");
}

#[test]
fn all_formats_give_the_same_tree() {
    let l1 = Layer::new()
        .dir("bin", 0o755)
        .file("bin/app", b"\x7fELF...", 0o755)
        .symlink("bin/sh", "app")
        .dir("etc", 0o755)
        .file("etc/conf", b"a=1", 0o644)
        .file("etc/old", b"old", 0o644)
        .tar();
    let l2 = Layer::new()
        .marker("etc/.wh.old")
        .file("etc/conf", b"a=2", 0o600)
        .hardlink("bin/app2", "bin/app")
        .tar();
    let tars = vec![l1, l2];
    let layout = layout_of(&tars, Compression::Gzip);
    let plain = layout_of(&tars, Compression::None);
    let dir = tempfile::tempdir().unwrap();
    let oci_tar = dir.path().join("oci.tar");
    oci_archive(layout.path(), &oci_tar);
    let docker_tar = dir.path().join("docker.tar");
    docker_archive(&docker_tar, &tars, "example.com/app:1");

    let mut images = vec![
        (layout.path().to_path_buf(), Format::OciLayout),
        (plain.path().to_path_buf(), Format::OciLayout),
        (oci_tar.clone(), Format::OciArchive),
        (docker_tar.clone(), Format::DockerArchive),
    ];
    let zstd = layout_of(&tars, Compression::Zstd);
    if cfg!(feature = "zstd") {
        images.push((zstd.path().to_path_buf(), Format::OciLayout));
    }
    let mut trees = Vec::new();
    let mut chain_ids = Vec::new();
    for (path, format) in &images {
        let image = Image::open(path, None).unwrap();
        assert_eq!(image.format(), *format);
        assert_eq!(image.layer_count(), 2);
        assert_eq!(image.config().cmd, ["--serve", "8080"]);
        chain_ids.push(image.chain_id().unwrap().to_string());
        let out = tempfile::tempdir().unwrap();
        image.unpack_to(&out.path().join("rootfs")).unwrap();
        trees.push(tree(&out.path().join("rootfs")));
    }
    assert!(trees[0].contains_key("bin/app2"));
    assert!(!trees[0].contains_key("etc/old"));
    for (i, t) in trees.iter().enumerate() {
        assert_eq!(t, &trees[0], "{:?}", images[i]);
        assert_eq!(chain_ids[i], chain_ids[0]);
    }
}

#[test]
fn second_use_is_a_cache_hit() {
    let tars = vec![
        Layer::new().file("f", b"x", 0o644).tar(),
        Layer::new().file("g", b"y", 0o644).tar(),
    ];
    let layout = layout_of(&tars, Compression::Gzip);
    let dir = tempfile::tempdir().unwrap();
    let docker_tar = dir.path().join("docker.tar");
    docker_archive(&docker_tar, &tars, "app:latest");
    let cache = tempfile::tempdir().unwrap();

    let first = prepare(layout.path(), None, Some(cache.path())).unwrap();
    assert!(!first.cache_hit);
    assert!(first.rootfs.join("f").exists() && first.rootfs.join("g").exists());
    let started = std::time::Instant::now();
    let second = prepare(layout.path(), None, Some(cache.path())).unwrap();
    assert!(second.cache_hit);
    assert_eq!(second.rootfs, first.rootfs);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // The same layers packaged differently share the entry.
    let third = prepare(&docker_tar, Some("app"), Some(cache.path())).unwrap();
    assert!(third.cache_hit);
    assert_eq!(third.rootfs, first.rootfs);
    assert_eq!(
        first
            .rootfs
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap(),
        hex(first.chain_id.as_deref().unwrap())
    );
    // The cache is private: images may hold setuid binaries and devices.
    let cache_dir = cache.path().join("private");
    prepare(layout.path(), None, Some(&cache_dir)).unwrap();
    let mode = std::fs::metadata(&cache_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    std::fs::remove_dir_all(&cache_dir).unwrap();
    // Only the entry: no temporary directories left.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);

    // A failed unpack leaves no cache entry.
    let bad = layout_of(
        &[Layer::new().file("../x", b"x", 0o644).tar()],
        Compression::None,
    );
    assert!(prepare(bad.path(), None, Some(cache.path())).is_err());
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
}

#[test]
fn image_config_and_overrides() {
    let layout = layout_of(
        &[Layer::new().file("bin/entry", b"", 0o755).tar()],
        Compression::Gzip,
    );
    let image = Image::open(layout.path(), None).unwrap();
    let config = image.config();
    assert_eq!(config.entrypoint, ["/bin/entry"]);
    assert_eq!(config.cmd, ["--serve", "8080"]);
    assert_eq!(config.env, ["PATH=/usr/bin:/bin", "MODE=test"]);
    assert_eq!(config.working_dir, "/srv");
    assert_eq!(config.user, "1000:1000");

    let p = config.process(&Overrides::default()).unwrap();
    assert_eq!(p.args, ["/bin/entry", "--serve", "8080"]);
    let p = config
        .process(&Overrides {
            args: vec!["--check".into()],
            env: vec!["MODE=prod".into()],
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(p.args, ["/bin/entry", "--check"]);
    assert_eq!(p.env, ["PATH=/usr/bin:/bin", "MODE=prod"]);
    let p = config
        .process(&Overrides {
            entrypoint: Some(vec!["/bin/sh".into()]),
            working_dir: Some("/".into()),
            user: Some("0".into()),
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(p.args, ["/bin/sh"]);
    assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/", "0"));
}

#[test]
fn manifest_selection() {
    let amd = vec![Layer::new().file("arch", b"amd64", 0o644).tar()];
    let arm = vec![Layer::new().file("arch", b"arm64", 0o644).tar()];
    let dir = tempfile::tempdir().unwrap();
    let mut d_amd = write_manifest(dir.path(), &amd, Compression::Gzip, "amd64");
    let mut d_arm = write_manifest(dir.path(), &arm, Compression::Gzip, "arm64");

    // Two platforms, no names: linux/amd64 is chosen.
    d_amd["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    d_arm["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
    write_index(dir.path(), vec![d_arm.clone(), d_amd.clone()]);
    let out = unpack_ok(dir.path());
    assert_eq!(
        std::fs::read(out.path().join("rootfs/arch")).unwrap(),
        b"amd64"
    );

    // Named: --ref picks; an unknown ref lists what there is.
    d_amd["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "v1"});
    d_arm["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "v1-arm"});
    write_index(dir.path(), vec![d_arm.clone(), d_amd.clone()]);
    assert!(Image::open(dir.path(), Some("v1")).is_ok());
    let err = Image::open(dir.path(), Some("v1-arm")).err().unwrap();
    assert!(err.to_string().contains("linux/arm64"), "{err}");
    let err = Image::open(dir.path(), Some("v2")).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("\"v2\"") && msg.contains("v1-arm") && msg.contains("v1 ("),
        "{msg}"
    );
    let by_digest = d_amd["digest"].as_str().unwrap().to_string();
    assert!(Image::open(dir.path(), Some(&by_digest)).is_ok());

    // Two manifests without platforms and no ref: ambiguous.
    let other = write_manifest(dir.path(), &amd, Compression::None, "amd64");
    let mut plain = d_amd.clone();
    plain.as_object_mut().unwrap().remove("platform");
    write_index(dir.path(), vec![plain, other]);
    let err = Image::open(dir.path(), None).err().unwrap();
    assert!(err.to_string().contains("--ref"), "{err}");

    // A nested index (what multi-platform copies look like).
    let nested =
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [d_arm, d_amd]}))
            .unwrap();
    let (digest, size) = write_blob(dir.path(), &nested);
    write_index(
        dir.path(),
        vec![
            serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": "multi"}}),
        ],
    );
    let image = Image::open(dir.path(), Some("multi")).unwrap();
    assert_eq!(image.id(), by_digest);
}

#[test]
fn not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let err = Image::open(dir.path(), None).err().unwrap();
    assert!(matches!(err, ImageError::UnknownFormat { .. }), "{err}");
    let file = dir.path().join("x.tar.gz");
    std::fs::write(&file, compress(b"not a tar", Compression::Gzip)).unwrap();
    let err = Image::open(&file, None).err().unwrap();
    assert!(err.to_string().contains("gzip"), "{err}");
    let missing = dir.path().join("missing");
    let err = Image::open(&missing, None).err().unwrap();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
    // The cause is the error's source only: its chain shows it once.
    assert_eq!(err.to_string(), missing.display().to_string());
    assert_eq!(
        protocols::error_chain(&err),
        format!(
            "{}: No such file or directory (os error 2)",
            missing.display()
        )
    );
}

#[test]
fn unpack_to_refuses_a_non_empty_output() {
    let layout = layout_of(
        &[Layer::new().file("f", b"x", 0o644).tar()],
        Compression::None,
    );
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("existing"), b"keep").unwrap();
    let err = Image::open(layout.path(), None)
        .unwrap()
        .unpack_to(out.path())
        .unwrap_err();
    assert!(matches!(err, ImageError::OutputExists { .. }), "{err}");
    assert_eq!(std::fs::read(out.path().join("existing")).unwrap(), b"keep");
    // An existing empty directory is fine.
    let empty = tempfile::tempdir().unwrap();
    Image::open(layout.path(), None)
        .unwrap()
        .unpack_to(empty.path())
        .unwrap();
    assert!(empty.path().join("f").exists());
}

#[test]
fn missing_end_of_archive_is_accepted_but_a_cut_header_is_not() {
    let full = Layer::new()
        .file("a", b"first", 0o644)
        .file("b", b"second", 0o644)
        .tar();
    // Header a, data a (padded), header b, data b: 6 bytes, unpadded, no footer.
    let unterminated = full[..512 * 3 + 6].to_vec();
    let layout = layout_of(&[unterminated], Compression::Gzip);
    let out = unpack_ok(layout.path());
    assert_eq!(
        std::fs::read(out.path().join("rootfs/b")).unwrap(),
        b"second"
    );

    let cut_header = full[..512 * 2 + 100].to_vec();
    let layout = layout_of(&[cut_header], Compression::Gzip);
    let (err, _) = unpack_err(layout.path());
    assert!(matches!(err, ImageError::LayerStream { .. }), "{err}");
}

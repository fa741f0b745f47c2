//! `rootfs-builder`: writes initramfs archives for microVM guests, builds
//! the default container rootfs and unpacks container images.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rootfs_builder::cpio::{self, Archive, EntryKind};
use rootfs_builder::image::{self, Image};

const USAGE: &str = "usage:
  rootfs-builder initramfs --init BINARY --out FILE [--busybox BUSYBOX] [--file HOST_PATH:GUEST_PATH]...
      Writes a newc initramfs with BINARY as /init, /dev/console and the
      usual mount points, plus each extra file. --busybox adds a static
      busybox as /bin/busybox with a link for each of its applets.
  rootfs-builder list FILE
      Lists the entries of a newc archive.
  rootfs-builder unpack --image PATH [--ref NAME] [--out DIR | --cache DIR]
      Unpacks a container image: an OCI image layout directory, an OCI
      archive or a docker-archive tarball. --ref picks the manifest (its
      ref name, tag or digest) when there are several; else linux/amd64.
      With --out, into DIR (which must not exist or be empty). Otherwise
      into the image cache (--cache DIR, else $MICROVM_IMAGE_CACHE, else
      $XDG_CACHE_HOME/microvm/images or ~/.cache/microvm/images), keyed by
      the layers, and prints the rootfs path.
  rootfs-builder image-config --image PATH [--ref NAME]
      Prints the image's run config (Entrypoint, Cmd, Env, ...) as JSON.
  rootfs-builder busybox-rootfs --busybox BUSYBOX --out DIR
      Builds the default container rootfs in DIR (replacing it): BUSYBOX
      as /bin/busybox with a link per applet, /etc/passwd, /etc/group and
      the empty mount points.

Set RUST_LOG=debug for details.";

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("initramfs") => initramfs(&args[1..]),
        Some("list") if args.len() == 2 => list(&args[1]),
        Some("unpack") => unpack(&args[1..]),
        Some("image-config") => image_config(&args[1..]),
        Some("busybox-rootfs") => busybox_rootfs(&args[1..]),
        _ => Err(anyhow::anyhow!("{USAGE}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, each cause once (see `protocols::errors`).
            eprintln!("rootfs-builder: {}", protocols::error_chain(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parses `--flag VALUE` pairs, each flag at most once, all in `allowed`.
fn flags(args: &[String], allowed: &[&str]) -> Result<std::collections::HashMap<String, String>> {
    let mut values = std::collections::HashMap::new();
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        if !allowed.contains(&flag.as_str()) {
            bail!("unknown argument {flag:?}\n{USAGE}");
        }
        let value = iter
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        if values.insert(flag.clone(), value.clone()).is_some() {
            bail!("{flag} given twice");
        }
    }
    Ok(values)
}

fn open_image(values: &std::collections::HashMap<String, String>) -> Result<Image> {
    let path = values
        .get("--image")
        .with_context(|| format!("--image is required\n{USAGE}"))?;
    Ok(Image::open(
        path.as_ref(),
        values.get("--ref").map(String::as_str),
    )?)
}

fn unpack(args: &[String]) -> Result<()> {
    let values = flags(args, &["--image", "--ref", "--out", "--cache"])?;
    if values.contains_key("--out") && values.contains_key("--cache") {
        bail!("--out and --cache exclude each other\n{USAGE}");
    }
    let image = open_image(&values)?;
    if let Some(out) = values.get("--out") {
        image.unpack_to(out.as_ref())?;
        println!(
            "unpacked {} ({} layers) into {out}",
            image.path().display(),
            image.layer_count()
        );
    } else {
        let cache = match values.get("--cache") {
            Some(dir) => PathBuf::from(dir),
            None => image::default_cache_dir()?,
        };
        let cache = std::path::absolute(&cache)
            .with_context(|| format!("resolving {}", cache.display()))?;
        let (rootfs, hit) = image.unpack_cached(&cache)?;
        if hit {
            tracing::info!("cache hit");
        }
        println!("{}", rootfs.display());
    }
    Ok(())
}

fn image_config(args: &[String]) -> Result<()> {
    let values = flags(args, &["--image", "--ref"])?;
    let image = open_image(&values)?;
    println!("{}", serde_json::to_string_pretty(image.config())?);
    Ok(())
}

fn busybox_rootfs(args: &[String]) -> Result<()> {
    let values = flags(args, &["--busybox", "--out"])?;
    let busybox = values
        .get("--busybox")
        .with_context(|| format!("--busybox is required\n{USAGE}"))?;
    let out = values
        .get("--out")
        .with_context(|| format!("--out is required\n{USAGE}"))?;
    rootfs_builder::default_rootfs::build(busybox.as_ref(), out.as_ref())?;
    println!("wrote the busybox rootfs to {out}");
    Ok(())
}

fn initramfs(args: &[String]) -> Result<()> {
    let mut init = None;
    let mut out = None;
    let mut extra = Vec::new();
    let mut busybox = None;
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut value = || {
            iter.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--init" => init = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--busybox" => busybox = Some(PathBuf::from(value()?)),
            "--file" => {
                let spec = value()?;
                let (host, guest) = spec
                    .split_once(':')
                    .with_context(|| format!("--file {spec}: expected HOST_PATH:GUEST_PATH"))?;
                extra.push((PathBuf::from(host), guest.to_string()));
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let init = init.with_context(|| format!("--init is required\n{USAGE}"))?;
    let out = out.with_context(|| format!("--out is required\n{USAGE}"))?;

    let mut archive = Archive::new();
    add_skeleton(&mut archive)?;
    archive
        .add_host_file("init", &init)
        .with_context(|| format!("adding init binary {}", init.display()))?;
    if let Some(busybox) = &busybox {
        rootfs_builder::busybox::add(&mut archive, busybox)?;
    }
    for (host, guest) in &extra {
        archive
            .add_host_file(guest, host)
            .with_context(|| format!("adding {} as {guest}", host.display()))?;
    }
    archive
        .write_file(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {} ({} entries)", out.display(), archive.len());
    Ok(())
}

/// The directories and device nodes every guest initramfs needs: the kernel
/// opens /dev/console for init's stdio before any devtmpfs is mounted.
fn add_skeleton(archive: &mut Archive) -> Result<()> {
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        archive.add_dir(dir, 0o755)?;
    }
    archive.add_dir("tmp", 0o1777)?;
    archive.add_char_device("dev/console", 0o600, 5, 1)?;
    archive.add_char_device("dev/null", 0o666, 1, 3)?;
    Ok(())
}

fn list(path: &str) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    for entry in cpio::parse(&bytes).with_context(|| format!("parsing {path}"))? {
        let what = match &entry.kind {
            EntryKind::Dir => "dir".to_string(),
            EntryKind::File(data) => format!("file {} bytes", data.len()),
            EntryKind::Symlink(target) => format!("symlink -> {target}"),
            EntryKind::CharDev { major, minor } => format!("char {major}:{minor}"),
            EntryKind::BlockDev { major, minor } => format!("block {major}:{minor}"),
        };
        println!("{:04o} {} ({what})", entry.permissions, entry.path);
    }
    Ok(())
}

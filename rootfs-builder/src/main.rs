//! `rootfs-builder`: writes initramfs archives for microVM guests.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rootfs_builder::cpio::{self, Archive, EntryKind};

const USAGE: &str = "usage:
  rootfs-builder initramfs --init BINARY --out FILE [--busybox BUSYBOX] [--file HOST_PATH:GUEST_PATH]...
      Writes a newc initramfs with BINARY as /init, /dev/console and the
      usual mount points, plus each extra file. --busybox adds a static
      busybox as /bin/busybox with a link for each of its applets.
  rootfs-builder list FILE
      Lists the entries of a newc archive.";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("initramfs") => initramfs(&args[1..]),
        Some("list") if args.len() == 2 => list(&args[1]),
        _ => bail!("{USAGE}"),
    }
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

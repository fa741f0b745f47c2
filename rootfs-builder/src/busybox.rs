//! Adding Debian's static busybox (package `busybox-static`) to an image:
//! the binary as /bin/busybox and one symlink per applet, at the paths
//! `busybox --list-full` names.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cpio::Archive;

pub const GUEST_PATH: &str = "bin/busybox";

/// The applet paths (relative, e.g. "usr/bin/awk") the binary provides.
pub fn applets(busybox: &Path) -> Result<Vec<String>> {
    let output = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| {
            format!(
                "running {} --list-full (install busybox-static)",
                busybox.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "{} --list-full failed: {}",
            busybox.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim().trim_start_matches('/').to_string())
        .filter(|line| !line.is_empty())
        .collect())
}

pub fn add(archive: &mut Archive, busybox: &Path) -> Result<()> {
    archive
        .add_host_file(GUEST_PATH, busybox)
        .with_context(|| format!("adding {}", busybox.display()))?;
    for applet in applets(busybox)? {
        if applet == GUEST_PATH {
            continue;
        }
        archive
            .add_symlink(&applet, "/bin/busybox")
            .with_context(|| format!("adding applet link {applet}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{parse, EntryKind};

    #[test]
    fn every_applet_links_to_busybox() {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            panic!("/bin/busybox is missing: install busybox-static (scripts/setup.sh does)");
        }
        let mut archive = Archive::new();
        add(&mut archive, busybox).unwrap();
        let mut bytes = Vec::new();
        archive.write_to(&mut bytes).unwrap();
        let entries = parse(&bytes).unwrap();
        let find = |path: &str| {
            entries
                .iter()
                .find(|e| e.path == path)
                .map(|e| e.kind.clone())
        };
        assert!(matches!(find("bin/busybox"), Some(EntryKind::File(data)) if data.len() > 100_000));
        assert_eq!(
            find("bin/sh"),
            Some(EntryKind::Symlink("/bin/busybox".into()))
        );
        assert_eq!(
            find("bin/cat"),
            Some(EntryKind::Symlink("/bin/busybox".into()))
        );
    }
}

//! Resolving an image's `User` (`name`, `uid`, `name:group`, `uid:gid`...)
//! to numeric IDs with the rootfs's own /etc/passwd and /etc/group, read
//! without following symlinks out of the rootfs.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::fs::{open_at, Root};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the groups of /etc/group that list the user.
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves `user` (empty = root) against the rootfs at `rootfs`. A missing
/// /etc/passwd or /etc/group is fine for numeric IDs.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<ResolvedUser, UserError> {
    let passwd = parse_passwd(&read_etc(rootfs, "passwd"));
    let groups = parse_group(&read_etc(rootfs, "group"));
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|p| p.uid == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|p| p.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?,
        ),
    };
    let uid = match user_part.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry.map_or(0, |e| e.uid),
    };
    let gid = match group_part.filter(|g| !g.is_empty()) {
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|g| g.name == group)
                .map(|g| g.gid)
                .ok_or_else(|| UserError::UnknownGroup(group.to_string()))?,
        },
        None => entry.map_or(0, |e| e.gid),
    };
    let additional_gids = match entry {
        Some(entry) => groups
            .iter()
            .filter(|g| g.gid != gid && g.members.contains(&entry.name))
            .map(|g| g.gid)
            .collect(),
        None => Vec::new(),
    };
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

/// `etc/NAME` of the rootfs, or "" when it is missing, a symlink or unreadable.
fn read_etc(rootfs: &Path, name: &str) -> String {
    let read = || -> std::io::Result<String> {
        let root = Root::open(rootfs)?;
        let etc = root
            .dir(&[OsString::from("etc")], false)
            .ok()
            .flatten()
            .ok_or(std::io::ErrorKind::NotFound)?;
        let fd = open_at(
            etc.as_fd(),
            OsStr::new(name),
            OFlag::O_RDONLY,
            Mode::empty(),
        )?;
        let mut text = String::new();
        std::fs::File::from(fd)
            .take(4 << 20)
            .read_to_string(&mut text)?;
        Ok(text)
    };
    read().unwrap_or_default()
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: fields.first()?.to_string(),
                uid: fields.get(2)?.parse().ok()?,
                gid: fields.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: fields.first()?.to_string(),
                gid: fields.get(2)?.parse().ok()?,
                members: fields
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nuser:x:1000:\nwheel:x:10:user,other\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn resolves_names_and_numbers() {
        let dir = rootfs();
        let r = |u: &str| resolve_user(dir.path(), u);
        assert_eq!(
            r("").unwrap(),
            ResolvedUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("user").unwrap(),
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10]
            }
        );
        assert_eq!(r("1000").unwrap().gid, 1000);
        assert_eq!(r("user:wheel").unwrap().gid, 10);
        assert_eq!(
            r("1234:5678").unwrap(),
            ResolvedUser {
                uid: 1234,
                gid: 5678,
                additional_gids: vec![]
            }
        );
        assert_eq!(r("nobody"), Err(UserError::UnknownUser("nobody".into())));
        assert_eq!(
            r("user:nogroup"),
            Err(UserError::UnknownGroup("nogroup".into()))
        );
    }

    #[test]
    fn symlinked_passwd_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("etc/passwd")).unwrap();
        // The host's root user must not be found through the link.
        assert_eq!(
            resolve_user(dir.path(), "root"),
            Err(UserError::UnknownUser("root".into()))
        );
    }
}

//! The cgroup a sandbox's VMM process (and all its threads) runs in, as
//! Kata's `sandbox_cgroup_only`: the whole VM (vCPUs, device threads, guest
//! memory) is accounted to and limited by one host cgroup, the pod's.
//!
//! On cgroup v2 (`/sys/fs/cgroup` is a cgroup2 mount) the cgroup is one
//! directory of the unified hierarchy; on cgroup v1 or hybrid layouts it is
//! one directory in each of the `cpu`, `cpuacct`, `memory` and `pids`
//! hierarchies that is mounted (found in `/proc/self/mountinfo`). The other
//! v1 hierarchies are left alone: `cpuset` would need its `cpus` and `mems`
//! filled in, and the hybrid layout's controller-less cgroup2 at
//! `/sys/fs/cgroup/unified` carries no limits.
//!
//! We only create directories and move processes: no systemd unit is made
//! for systemd-form paths, the directories are the ones systemd would use.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the cgroup file systems are mounted; a cgroup2 mount here means
/// the unified (v2) layout.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 hierarchies the cgroup is made in, each if it is mounted.
const V1_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

/// The v2 controllers enabled for the cgroup's subtree where available.
const V2_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];

/// The slice of a systemd-form path that names none, as runc does.
const DEFAULT_SLICE: &str = "system.slice";

/// How long [`VmmCgroup::remove`] retries an `rmdir` that fails with EBUSY:
/// a killed process leaves its cgroup a moment after `wait()` returns.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(1);
const REMOVE_RETRY: Duration = Duration::from_millis(10);

/// How often [`VmmCgroup::create`] restarts the directory chain when a
/// parent vanishes under it (another sandbox removing a parent it made).
const CREATE_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `linux.cgroupsPath` (or the default path) is not a usable cgroup path.
    #[error("invalid cgroups path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// Reading `/proc/self/mountinfo` to find the v1 hierarchies failed.
    #[error("finding the cgroup hierarchies in {path}")]
    Hierarchies { path: PathBuf, source: io::Error },
    /// Neither a cgroup2 at `/sys/fs/cgroup` nor any of the v1 hierarchies
    /// we use is mounted.
    #[error(
        "no cgroup file system to use: {CGROUP_ROOT} is not cgroup2 and none of the \
         cpu, cpuacct, memory, pids v1 hierarchies is mounted"
    )]
    NoHierarchy,
    /// `mkdir` of one directory of the cgroup's chain failed.
    #[error("creating the cgroup directory {path}")]
    Create { path: PathBuf, source: io::Error },
    /// Opening a `cgroup.procs` file for a [`CgroupJoiner`] failed.
    #[error("opening {path}")]
    OpenProcs { path: PathBuf, source: io::Error },
    /// Writing a pid to a `cgroup.procs` file failed.
    #[error("moving process {pid} into the cgroup through {path}")]
    AddProcess {
        pid: u32,
        path: PathBuf,
        source: io::Error,
    },
}

/// Which kind of cgroup hierarchies the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// cgroup v2 only: one hierarchy, controllers enabled per subtree.
    Unified,
    /// cgroup v1 (or hybrid): one hierarchy per controller (or group of them).
    Legacy,
}

/// A sandbox's cgroup: one directory per hierarchy, and which directories
/// (the cgroup's and any parents on the way) we created and so remove.
#[derive(Debug)]
pub struct VmmCgroup {
    /// The cgroup's path below each hierarchy's root, e.g. "/microvm/abc".
    path: PathBuf,
    /// The cgroup's directory in each hierarchy, in the order found.
    paths: Vec<PathBuf>,
    /// The directories we created, in creation order (a parent before its
    /// children); [`VmmCgroup::remove`] goes through them backwards.
    created: Vec<PathBuf>,
}

/// The open `cgroup.procs` files of a [`VmmCgroup`], for a forked child to
/// join the cgroup before exec without allocating (see [`CgroupJoiner::join`]).
#[derive(Debug)]
pub struct CgroupJoiner {
    /// `cgroup.procs` of each hierarchy, opened O_WRONLY|O_CLOEXEC.
    procs: Vec<File>,
}

impl CgroupJoiner {
    /// Moves the calling process (with all its threads) into the cgroup in
    /// every hierarchy by writing "0" to each `cgroup.procs`.
    ///
    /// Async-signal-safe, for `CommandExt::pre_exec`: only write(2) on fds
    /// opened before the fork, nothing allocated (an error is an OS error
    /// code or a static one).
    pub fn join(&self) -> io::Result<()> {
        for procs in &self.procs {
            // `write_all` on a `&File` is write(2), retried on EINTR.
            (&*procs).write_all(b"0")?;
        }
        Ok(())
    }
}

impl VmmCgroup {
    /// Creates (or joins, where directories exist) the cgroup for a sandbox.
    ///
    /// `cgroups_path` is the OCI `linux.cgroupsPath` of the pod's sandbox
    /// spec, in cgroupfs form ("/kubepods/besteffort/pod123/abc", or
    /// relative "a/b", taken from the hierarchy's root) or systemd form
    /// ("slice:prefix:name", see [`resolve_path`]).
    pub fn create(cgroups_path: &str) -> Result<VmmCgroup, CgroupError> {
        let path = resolve_path(cgroups_path)?;
        let (layout, roots) = hierarchies()?;
        Self::create_in(path, layout, &roots)
    }

    /// The path used when there is no spec path (`ctr run` without one,
    /// `microvm run`): "/microvm/<id>".
    pub fn default_path(id: &str) -> String {
        format!("/microvm/{id}")
    }

    /// Makes the directory chain of `path` (resolved, absolute) under each
    /// of `roots`, all hierarchies of `layout`.
    fn create_in(path: PathBuf, layout: Layout, roots: &[PathBuf]) -> Result<Self, CgroupError> {
        // Built as we go, so that an error drops it and removes what we made.
        let mut cgroup = VmmCgroup {
            path,
            paths: Vec::with_capacity(roots.len()),
            created: Vec::new(),
        };
        for root in roots {
            let dir = cgroup.make_chain(root, layout)?;
            cgroup.paths.push(dir);
        }
        tracing::debug!(
            "cgroup {} in {:?} (created {:?})",
            cgroup.path.display(),
            cgroup.paths,
            cgroup.created
        );
        Ok(cgroup)
    }

    /// Makes every missing directory of the cgroup's path under `root`,
    /// recording those we create, and returns the cgroup's directory.
    fn make_chain(&mut self, root: &Path, layout: Layout) -> Result<PathBuf, CgroupError> {
        let mut attempt = 0;
        'chain: loop {
            attempt += 1;
            let mut dir = root.to_path_buf();
            for name in relative_components(&self.path) {
                let parent = dir.clone();
                dir.push(name);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {
                        self.created.push(dir.clone());
                        if layout == Layout::Unified {
                            enable_controllers(&parent);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    // A parent that existed was removed by whoever made it.
                    Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < CREATE_ATTEMPTS => {
                        tracing::debug!("{} vanished, creating the cgroup again", parent.display());
                        continue 'chain;
                    }
                    Err(source) => return Err(CgroupError::Create { path: dir, source }),
                }
            }
            return Ok(dir);
        }
    }

    /// The cgroup's path below each hierarchy's root, e.g. "/microvm/abc"
    /// (what `/proc/<pid>/cgroup` shows for a member).
    pub fn cgroup_path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's directory in each hierarchy, for logs and tests.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Opens every hierarchy's `cgroup.procs`, for a child to join the
    /// cgroup between fork and exec:
    /// `command.pre_exec(move || joiner.join())`.
    pub fn joiner(&self) -> Result<CgroupJoiner, CgroupError> {
        let procs = self
            .paths
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(|source| CgroupError::OpenProcs { path, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(CgroupJoiner { procs })
    }

    /// Moves process `pid` (with all its threads) into the cgroup in every
    /// hierarchy.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in &self.paths {
            let path = dir.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut procs| procs.write_all(pid.to_string().as_bytes()))
                .map_err(|source| CgroupError::AddProcess { pid, path, source })?;
        }
        Ok(())
    }

    /// Removes the directories this `VmmCgroup` created, deepest first, once
    /// no process is left in them (an `rmdir` failing with EBUSY is retried
    /// for up to a second). Directories that existed before are left alone,
    /// and so is a parent we created that another cgroup now lives in.
    /// What could not be removed is logged and tried again by the next call;
    /// idempotent otherwise. `Drop` calls it.
    pub fn remove(&mut self) {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        // What is still in a cgroup we made is the VMM's (its children,
        // a test's stand-in's): it would keep the directory busy forever.
        for leaf in self.paths.iter().filter(|dir| self.created.contains(dir)) {
            kill_all(leaf);
        }
        let mut kept = Vec::new();
        while let Some(dir) = self.created.pop() {
            if !remove_dir(&dir, deadline) {
                kept.push(dir);
            }
        }
        kept.reverse();
        self.created = kept;
    }
}

/// For a shim that died with its VMM: kills what is left in the cgroup
/// `cgroups_path` (its VMM, dying of its parent-death signal anyway) and
/// removes its directory in every hierarchy. Only the leaf: which parents
/// the dead shim created is not known, and a parent is usually shared.
/// Errors are logged.
pub fn remove_leftover(cgroups_path: &str) {
    let (path, (_, roots)) = match resolve_path(cgroups_path).and_then(|p| Ok((p, hierarchies()?)))
    {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!("a dead sandbox's cgroup: {}", protocols::error_chain(&e));
            return;
        }
    };
    let deadline = Instant::now() + REMOVE_TIMEOUT * 2;
    for root in roots {
        let mut dir = root;
        dir.extend(relative_components(&path));
        kill_all(&dir);
        if !remove_dir(&dir, deadline) {
            tracing::warn!("a dead sandbox's cgroup {} stays", dir.display());
        }
    }
}

impl Drop for VmmCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `rmdir` of a cgroup directory we created, retried on EBUSY (processes
/// still leaving it) until `deadline`. Whether it is gone.
/// Sends SIGKILL to every process in the cgroup directory `dir`.
fn kill_all(dir: &Path) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        tracing::debug!("killing process {pid}, left in cgroup {}", dir.display());
        // SAFETY: kill with integer arguments.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn remove_dir(dir: &Path, deadline: Instant) -> bool {
    loop {
        // A child cgroup (another sandbox's, under a parent we made) also
        // gives EBUSY, but will not go away by waiting.
        if has_child_cgroups(dir) {
            tracing::debug!("leaving cgroup {}: other cgroups are in it", dir.display());
            return false;
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(REMOVE_RETRY);
            }
            Err(e) => {
                tracing::warn!("removing cgroup {}: {e}", dir.display());
                return false;
            }
        }
    }
}

/// Whether the cgroup directory `dir` has child cgroups (subdirectories).
fn has_child_cgroups(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .filter_map(Result::ok)
        .any(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
}

/// Enables in `parent`'s `cgroup.subtree_control` those of
/// [`V2_CONTROLLERS`] its `cgroup.controllers` offers, one at a time. A
/// failure (EBUSY when `parent` has processes of its own, a controller
/// not delegated to us) only costs that controller's limits: logged, not
/// fatal.
fn enable_controllers(parent: &Path) {
    let read = |name: &str| std::fs::read_to_string(parent.join(name));
    let (available, enabled) = match (read("cgroup.controllers"), read("cgroup.subtree_control")) {
        (Ok(available), Ok(enabled)) => (available, enabled),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(
                "reading the controllers of cgroup {}: {e}",
                parent.display()
            );
            return;
        }
    };
    let control = parent.join("cgroup.subtree_control");
    for controller in controllers_to_enable(&available, &enabled) {
        let written = OpenOptions::new()
            .write(true)
            .open(&control)
            .and_then(|mut file| file.write_all(format!("+{controller}").as_bytes()));
        if let Err(e) = written {
            tracing::debug!("enabling {controller} in {}: {e}", control.display());
        }
    }
}

/// Those of [`V2_CONTROLLERS`] listed in `available` (a `cgroup.controllers`)
/// but not in `enabled` (a `cgroup.subtree_control`).
fn controllers_to_enable(available: &str, enabled: &str) -> Vec<&'static str> {
    let listed = |list: &str, name: &str| list.split_whitespace().any(|c| c == name);
    V2_CONTROLLERS
        .into_iter()
        .filter(|c| listed(available, c) && !listed(enabled, c))
        .collect()
}

/// The layout of the host's cgroups and the root directory of each
/// hierarchy the cgroup is made in.
fn hierarchies() -> Result<(Layout, Vec<PathBuf>), CgroupError> {
    let unified = nix::sys::statfs::statfs(CGROUP_ROOT)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    if unified {
        return Ok((Layout::Unified, vec![PathBuf::from(CGROUP_ROOT)]));
    }
    let mountinfo = Path::new("/proc/self/mountinfo");
    let info = std::fs::read_to_string(mountinfo).map_err(|source| CgroupError::Hierarchies {
        path: mountinfo.into(),
        source,
    })?;
    let roots = v1_hierarchies(&info);
    if roots.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok((Layout::Legacy, roots))
}

/// The mount points of the v1 hierarchies of [`V1_CONTROLLERS`] in
/// `mountinfo` (a `/proc/self/mountinfo`), each once (co-mounted
/// controllers share one), in [`V1_CONTROLLERS`]' order. Of several mounts
/// of a hierarchy, one of its root is preferred.
fn v1_hierarchies(mountinfo: &str) -> Vec<PathBuf> {
    let mounts: Vec<MountInfo> = mountinfo
        .lines()
        .filter_map(MountInfo::parse)
        .filter(|m| m.fstype == "cgroup")
        .collect();
    let mut roots: Vec<PathBuf> = Vec::new();
    for controller in V1_CONTROLLERS {
        let mut candidates = mounts
            .iter()
            .filter(|m| m.super_options.split(',').any(|o| o == controller));
        let chosen = candidates
            .clone()
            .find(|m| m.root == "/")
            .or_else(|| candidates.next());
        if let Some(mount) = chosen {
            if !roots.contains(&mount.mount_point) {
                roots.push(mount.mount_point.clone());
            }
        }
    }
    roots
}

/// The fields of a `/proc/self/mountinfo` line we use.
struct MountInfo<'a> {
    /// The directory of the file system mounted ("/" for all of it).
    root: &'a str,
    /// Where it is mounted, unescaped.
    mount_point: PathBuf,
    /// The file system type ("cgroup", "cgroup2", ...).
    fstype: &'a str,
    /// The per-superblock options; a v1 cgroup's controllers ("rw,cpu,cpuacct").
    super_options: &'a str,
}

impl<'a> MountInfo<'a> {
    /// `line`'s fields: ID, parent ID, major:minor, root, mount point,
    /// options, optional fields ended by "-", fstype, source, super options.
    fn parse(line: &'a str) -> Option<Self> {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = 6 + fields.get(6..)?.iter().position(|f| *f == "-")?;
        Some(MountInfo {
            root: fields.get(3).copied()?,
            mount_point: PathBuf::from(crate::mountinfo::unescape(fields.get(4)?)),
            fstype: fields.get(separator + 1).copied()?,
            super_options: fields.get(separator + 3).copied()?,
        })
    }
}

/// The cgroup path, below each hierarchy's root, that `cgroups_path` (an
/// OCI `linux.cgroupsPath`) names, as an absolute normalised path:
///
/// - cgroupfs form: "/kubepods/besteffort/pod123/abc" as is, a relative
///   "a/b" as "/a/b"; empty and "." components are dropped.
/// - systemd form "slice:prefix:name" (no leading "/", two ':'): the
///   slice expanded as systemd nests slices, then the unit
///   "<prefix>-<name>.scope" (or the name itself if it is a slice):
///   "kubepods-besteffort-pod123.slice:cri-containerd:abc" is
///   "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod123.slice/cri-containerd-abc.scope".
///   "-.slice" is the root slice; an empty slice is "system.slice".
///
/// Rejected: NUL bytes, ".." components, a path naming the root.
pub fn resolve_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: cgroups_path.to_owned(),
        reason,
    };
    if cgroups_path.contains('\0') {
        return Err(invalid("it contains a NUL byte"));
    }
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let mut path = PathBuf::from("/");
    if !cgroups_path.starts_with('/') && parts.len() == 3 {
        let (slice, prefix, name) = (parts[0], parts[1], parts[2]);
        if [slice, prefix, name].iter().any(|p| p.contains('/')) {
            return Err(invalid(
                "a systemd slice, prefix or name cannot contain '/'",
            ));
        }
        let slice = if slice.is_empty() {
            DEFAULT_SLICE
        } else {
            slice
        };
        for dir in expand_slice(slice).map_err(invalid)? {
            path.push(dir);
        }
        path.push(unit_name(prefix, name).map_err(invalid)?);
    } else {
        path.push(cgroups_path);
    }
    // The components below the root, normalised ("a//./b" is "a/b").
    let mut normal = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(name) => normal.push(name),
            Component::ParentDir => return Err(invalid("'..' is not allowed")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if normal == Path::new("/") {
        return Err(invalid("it names no cgroup below the root"));
    }
    Ok(normal)
}

/// The directories of systemd slice `slice`, outermost first:
/// "a-b-c.slice" is in "a.slice/a-b.slice/a-b-c.slice"; "-.slice" (the
/// root slice) is none.
fn expand_slice(slice: &str) -> Result<Vec<String>, &'static str> {
    if slice == "-.slice" {
        return Ok(Vec::new());
    }
    let Some(name) = slice.strip_suffix(".slice") else {
        return Err("a systemd slice must end in \".slice\"");
    };
    let mut dirs = Vec::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if part.is_empty() {
            return Err("a systemd slice name has an empty '-'-separated part");
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        dirs.push(format!("{prefix}.slice"));
    }
    Ok(dirs)
}

/// The systemd unit of a systemd-form path: "<prefix>-<name>.scope"
/// ("<name>.scope" without a prefix), or `name` if it is a slice.
fn unit_name(prefix: &str, name: &str) -> Result<String, &'static str> {
    if name.is_empty() {
        return Err("a systemd-form path needs a name after the second ':'");
    }
    Ok(if name.ends_with(".slice") {
        name.to_owned()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    })
}

/// The components of an absolute cgroup path below the root.
fn relative_components(path: &Path) -> impl Iterator<Item = &std::ffi::OsStr> {
    path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn resolved(path: &str) -> String {
        match resolve_path(path) {
            Ok(p) => p.display().to_string(),
            Err(e) => panic!("{}", protocols::errors::error_chain(&e)),
        }
    }

    fn rejected(path: &str) -> String {
        match resolve_path(path) {
            Ok(p) => panic!("{path:?} resolved to {}", p.display()),
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains(&format!("{path:?}")), "{message}");
                message
            }
        }
    }

    #[test]
    fn cgroupfs_paths_are_taken_from_the_root() {
        assert_eq!(
            resolved("/kubepods/besteffort/pod123/abc"),
            "/kubepods/besteffort/pod123/abc"
        );
        assert_eq!(resolved("a/b"), "/a/b");
        assert_eq!(resolved("//a/./b/"), "/a/b");
        assert_eq!(resolved("/a:b"), "/a:b");
        // A leading "/" makes even two ':' a cgroupfs path.
        assert_eq!(resolved("/a:b:c"), "/a:b:c");
        assert_eq!(resolved(&VmmCgroup::default_path("abc")), "/microvm/abc");
    }

    #[test]
    fn systemd_paths_are_expanded() {
        assert_eq!(
            resolved("kubepods-besteffort-pod123.slice:cri-containerd:abc"),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod123.slice/cri-containerd-abc.scope"
        );
        assert_eq!(resolved("-.slice:docker:abc"), "/docker-abc.scope");
        assert_eq!(resolved("system.slice::abc"), "/system.slice/abc.scope");
        assert_eq!(resolved(":crio:abc"), "/system.slice/crio-abc.scope");
        assert_eq!(
            resolved("machine.slice:x:pod.slice"),
            "/machine.slice/pod.slice"
        );
    }

    #[test]
    fn bad_paths_are_rejected() {
        assert!(rejected("").contains("no cgroup"));
        assert!(rejected("/").contains("no cgroup"));
        assert!(rejected("//./").contains("no cgroup"));
        assert!(rejected("/a/../../etc").contains(".."));
        assert!(rejected("..").contains(".."));
        assert!(rejected("a/b\0c").contains("NUL"));
        assert!(rejected("kubepods.scope:p:abc").contains(".slice"));
        assert!(rejected("a--b.slice:p:abc").contains("empty"));
        assert!(rejected("-a.slice:p:abc").contains("empty"));
        assert!(rejected("a.slice:p:").contains("name"));
        assert!(rejected("a.slice:p:../x").contains('/'));
    }

    #[test]
    fn v1_hierarchies_come_from_mountinfo() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 /sub /mnt/mem\\040b rw,relatime - cgroup cgroup rw,memory
36 31 0:32 / /mnt/mem rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/pidsx rw,relatime - cgroup cgroup rw,xpids
";
        assert_eq!(
            v1_hierarchies(info),
            [
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                PathBuf::from("/mnt/mem")
            ]
        );
        assert_eq!(
            v1_hierarchies("35 31 0:32 /sub /mnt/mem\\040b rw - cgroup cgroup rw,memory"),
            [PathBuf::from("/mnt/mem b")]
        );
    }

    #[test]
    fn only_offered_controllers_not_yet_enabled_are_enabled() {
        assert_eq!(
            controllers_to_enable("cpuset cpu io memory hugetlb pids rdma\n", "cpu\n"),
            ["memory", "pids", "io"]
        );
        assert!(controllers_to_enable("", "").is_empty());
        assert!(controllers_to_enable("cpuset cpu", "cpuset cpu").is_empty());
    }

    /// A cgroup path of its own for each test: "/microvm-test-<pid>-<n>".
    fn test_root() -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        format!(
            "/microvm-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Fails (never skips) the test unless we can make cgroups.
    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes cgroups and needs root (euid {})",
            nix::unistd::geteuid()
        );
    }

    fn create(path: &str) -> VmmCgroup {
        VmmCgroup::create(path).unwrap_or_else(|e| {
            panic!(
                "creating cgroup {path} (is a cgroup file system mounted and writable?): {}",
                protocols::errors::error_chain(&e)
            )
        })
    }

    fn sleeper(joiner: Option<CgroupJoiner>) -> Child {
        let mut command = Command::new("sleep");
        command.arg("30");
        if let Some(joiner) = joiner {
            // SAFETY: `join` only calls write(2) on fds opened before fork
            // and allocates nothing, as a pre_exec closure must.
            unsafe {
                command.pre_exec(move || joiner.join());
            }
        }
        command.spawn().expect("spawning sleep")
    }

    /// The cgroup paths of `pid`'s lines in `/proc/<pid>/cgroup` whose
    /// controllers include one of `controllers` ("" is the v2 line's).
    fn cgroups_of(pid: u32, controllers: &[&str]) -> Vec<String> {
        let file = format!("/proc/{pid}/cgroup");
        let text = std::fs::read_to_string(&file).expect(&file);
        text.lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (_, names, path) = (fields.next()?, fields.next()?, fields.next()?);
                names
                    .split(',')
                    .any(|n| controllers.contains(&n))
                    .then(|| path.to_owned())
            })
            .collect()
    }

    /// Checks `pid` is in `cgroup` in the memory hierarchy (every hierarchy
    /// we use on v1), or the unified one on v2.
    fn assert_member(pid: u32, cgroup: &VmmCgroup, layout: Layout) {
        let expected = cgroup.cgroup_path().display().to_string();
        let (controllers, label): (&[&str], _) = match layout {
            Layout::Unified => (&[""][..], "unified"),
            Layout::Legacy => (&V1_CONTROLLERS[..], "v1"),
        };
        let found = cgroups_of(pid, controllers);
        assert!(!found.is_empty(), "pid {pid} has no {label} cgroup line");
        assert!(
            found.iter().all(|p| *p == expected),
            "pid {pid} is in {found:?}, not {expected}"
        );
        if layout == Layout::Legacy {
            assert_eq!(cgroups_of(pid, &["memory"]), [expected], "memory hierarchy");
        }
    }

    fn end(mut child: Child) {
        child.kill().expect("killing sleep");
        child.wait().expect("waiting for sleep");
    }

    #[test]
    fn a_child_joins_and_the_cgroup_is_removed() {
        require_root();
        let (layout, roots) = hierarchies().expect("finding the cgroup hierarchies");
        let root = test_root();
        let mut cgroup = create(&format!("{root}/vmm"));
        assert_eq!(cgroup.paths().len(), roots.len());
        for (dir, hierarchy) in cgroup.paths().iter().zip(&roots) {
            assert_eq!(*dir, hierarchy.join(&root[1..]).join("vmm"));
            assert!(dir.is_dir(), "{}", dir.display());
        }
        // Both directories of the chain, in every hierarchy.
        let created = cgroup.created.clone();
        assert_eq!(created.len(), 2 * roots.len(), "{created:?}");

        let joined = sleeper(Some(cgroup.joiner().expect("opening cgroup.procs")));
        assert_member(joined.id(), &cgroup, layout);
        let added = sleeper(None);
        cgroup.add_process(added.id()).expect("adding a process");
        assert_member(added.id(), &cgroup, layout);

        end(joined);
        end(added);
        cgroup.remove();
        for dir in &created {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
        assert!(cgroup.created.is_empty());
        cgroup.remove();
    }

    #[test]
    fn what_is_left_in_a_cgroup_we_made_is_killed_on_removal() {
        require_root();
        let root = test_root();
        let mut cgroup = create(&format!("{root}/vmm"));
        let created = cgroup.created.clone();
        // A VMM's child that outlived it.
        let mut left = sleeper(Some(cgroup.joiner().expect("opening cgroup.procs")));
        cgroup.remove();
        let status = left.wait().expect("waiting for sleep");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status}"
        );
        for dir in &created {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
    }

    #[test]
    fn a_pre_existing_parent_is_left() {
        require_root();
        let root = test_root();
        let mut parent = create(&root);
        let mut child = create(&format!("{root}/vmm"));
        assert_eq!(child.created, child.paths(), "only the leaf is ours");
        let mut again = create(&format!("{root}/vmm"));
        assert!(again.created.is_empty(), "joined, not created");
        again.remove();
        assert!(child.paths().iter().all(|dir| dir.is_dir()));

        child.remove();
        for (dir, parent_dir) in child.paths().iter().zip(parent.paths()) {
            assert!(!dir.exists(), "{} is left", dir.display());
            assert!(parent_dir.is_dir(), "{} is gone", parent_dir.display());
        }
        parent.remove();
        assert!(parent.paths().iter().all(|dir| !dir.exists()));
    }

    #[test]
    fn a_parent_we_made_stays_while_another_cgroup_is_in_it() {
        require_root();
        let root = test_root();
        let mut first = create(&format!("{root}/a"));
        let mut second = create(&format!("{root}/b"));
        let started = Instant::now();
        first.remove();
        assert!(
            started.elapsed() < REMOVE_TIMEOUT / 2,
            "waited for a child cgroup"
        );
        assert!(first.paths().iter().all(|dir| !dir.exists()));
        assert!(second.paths().iter().all(|dir| dir.is_dir()));
        // The parent is still first's to remove, second's only to join.
        assert_eq!(first.created.len(), second.paths().len());
        second.remove();
        first.remove();
        for dir in second.paths() {
            assert!(!dir.parent().unwrap().exists(), "{} is left", dir.display());
        }
    }

    /// The v2 code path, on the cgroup2 of a hybrid layout (on a unified
    /// host the round trip above covers it).
    #[test]
    fn a_child_joins_a_unified_hierarchy() {
        require_root();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let unified = info
            .lines()
            .filter_map(MountInfo::parse)
            .find(|m| m.fstype == "cgroup2" && m.root == "/")
            .map(|m| m.mount_point);
        let Some(unified) = unified else {
            println!("no cgroup2 mounted: the v2 code path is not tested here");
            return;
        };
        if unified == Path::new(CGROUP_ROOT) {
            println!("{CGROUP_ROOT} is cgroup2: the round trip tested it");
            return;
        }
        let path = resolve_path(&format!("{}/vmm", test_root())).unwrap();
        let mut cgroup = VmmCgroup::create_in(path, Layout::Unified, &[unified])
            .unwrap_or_else(|e| panic!("{}", protocols::errors::error_chain(&e)));
        let created = cgroup.created.clone();
        assert_eq!(created.len(), 2);
        let child = sleeper(Some(cgroup.joiner().unwrap()));
        assert_member(child.id(), &cgroup, Layout::Unified);
        end(child);
        cgroup.remove();
        assert!(created.iter().all(|dir| !dir.exists()), "{created:?}");
    }
}

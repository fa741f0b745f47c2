//! The VMM's confinement (docs/design/vmm-jail.md): a malicious guest that
//! found a bug in our devices would own this process, so the process owns
//! as little as it can.
//!
//! In the order `main` applies it:
//! 1. [`seccomp::prepare`]: `no_new_privs`, every thread kind's filter
//!    compiled once (the supervisor's too: it inherits it at the split).
//! 2. [`split_pid_namespace`]: a new PID namespace; the VMM proper runs as
//!    its PID 1, the process the runtime started stays behind as a small
//!    [`supervisor`] that passes the VMM's end on (and names the system
//!    call when a seccomp filter killed it).
//! 3. [`Jail::prepare`]: new mount, network (empty: taps come open), IPC
//!    and UTS namespaces for the whole process. In the mount namespace, the
//!    future root (a small tmpfs) holds only the shares (`/fs/N`), a
//!    read-only proc of the VMM's own PID namespace showing its own process
//!    only (`/proc`, also mounted over the host's `/proc` at once, for the
//!    file server's `/proc/self/fd`), and, read-only, the vsock socket's
//!    directory (`/vsock`, for guest connections to host ports).
//!    Everything else the VMM needs (`/dev/kvm`, the kernel and initramfs,
//!    taps, the console file, the vsock listener) is opened before the root
//!    changes.
//! 4. `Vm::build` opens all that.
//! 5. [`Jail::enter`]: `pivot_root` into the tmpfs (then read-only), the
//!    host's tree detached, core dumps off.
//! 6. Each thread, as it starts, calls [`confine_thread`]: its capabilities
//!    cut to what its kind needs (a virtio-fs thread: [`FS_CAPS`]; every
//!    other thread: none; the bounding set likewise), then its seccomp
//!    list.

pub mod seccomp;
mod supervisor;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use seccomp::ThreadKind;
pub use supervisor::split_pid_namespace;

use crate::vm::{FsConfig, VsockConfig};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{what} for the jail")]
    Syscall {
        what: String,
        source: std::io::Error,
    },
    #[error("the jail's root {0} is not an empty directory")]
    BadRoot(PathBuf),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("dropping capabilities")]
    Caps(#[source] caps::errors::CapsError),
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<(), JailError> {
    if rc != 0 {
        return Err(JailError::Syscall {
            what: what(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL byte")
}

/// The capabilities the jailed VMM's file server threads keep (the other
/// threads keep none), set once by [`Jail::prepare`]. Unset (not jailed):
/// threads keep what they have.
static KEPT_CAPS: OnceLock<caps::CapsHashSet> = OnceLock::new();

/// What the virtio-fs server needs to act for the guest's users on the
/// share: take on their credentials per request (SETUID, SETGID), create
/// files owned by them (CHOWN), reach and change files whatever their mode
/// and owner, as the guest's root may (DAC_OVERRIDE, FOWNER), keep setgid
/// bits and file capabilities the guest sets (FSETID, SETFCAP), and make
/// hard links (the server links by descriptor, `linkat(fd, "",
/// AT_EMPTY_PATH)`, which the kernel allows only with DAC_READ_SEARCH; its
/// danger, `open_by_handle_at`, is on no seccomp list). Not MKNOD (no
/// device nodes on the host), SYS_ADMIN, or anything else.
pub const FS_CAPS: [caps::Capability; 8] = [
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETFCAP,
];

/// Confines the calling thread for the rest of its life: capabilities (when
/// jailed), then its seccomp list. Every VMM thread calls it first thing.
pub fn confine_thread(kind: ThreadKind) -> Result<(), JailError> {
    if let Some(kept) = KEPT_CAPS.get() {
        if kind == ThreadKind::Fs {
            drop_caps(kept)?;
        } else {
            drop_caps(&caps::CapsHashSet::new())?;
        }
    }
    seccomp::install(kind)?;
    Ok(())
}

pub use seccomp::{test_violation, test_violation_due};

/// Cuts the calling thread's bounding, permitted, effective, inheritable
/// and ambient sets to `kept`.
fn drop_caps(kept: &caps::CapsHashSet) -> Result<(), JailError> {
    use caps::CapSet;
    for cap in caps::all() {
        if !kept.contains(&cap) {
            match caps::drop(None, CapSet::Bounding, cap) {
                Ok(()) => {}
                // A capability this kernel does not know.
                Err(_) if !caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) => {}
                Err(e) => return Err(JailError::Caps(e)),
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(JailError::Caps)?;
    caps::clear(None, CapSet::Inheritable).map_err(JailError::Caps)?;
    caps::set(None, CapSet::Effective, kept).map_err(JailError::Caps)?;
    caps::set(None, CapSet::Permitted, kept).map_err(JailError::Caps)?;
    Ok(())
}

/// The jail being built: its root, not yet entered.
pub struct Jail {
    root: PathBuf,
}

impl Jail {
    /// Step 3 (see the module): a mount namespace of our own, the future
    /// root mounted at `root` (an empty directory) with the shares and the
    /// vsock socket's directory in it. Rewrites `fs` to the shares' paths
    /// there (the file server opens them before the root changes) and
    /// `vsock` to connect to host ports through the jail's `/vsock`.
    pub fn prepare(
        root: &Path,
        fs: &mut [FsConfig],
        vsock: Option<&mut VsockConfig>,
    ) -> Result<Jail, JailError> {
        let empty = std::fs::read_dir(root)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(JailError::BadRoot(root.to_path_buf()));
        }
        let root_c = c_path(root);
        // SAFETY: (of the calls in this function) plain system calls on C
        // strings that live across them.
        unsafe {
            // All of them now, before any other thread exists: a namespace
            // is a thread's, and threads inherit their creator's. The
            // network one is empty: the taps came open (`--net fd=N`).
            check(
                libc::unshare(
                    libc::CLONE_NEWNS
                        | libc::CLONE_NEWNET
                        | libc::CLONE_NEWIPC
                        | libc::CLONE_NEWUTS,
                ),
                || "mount, network, IPC and UTS namespaces".into(),
            )?;
            let name = b"microvm-vmm";
            check(libc::sethostname(name.as_ptr().cast(), name.len()), || {
                "naming the host".into()
            })?;
            // Nothing we mount leaks out; what the runtime mounts under the
            // shares later (containers' root file systems) still comes in.
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ),
                || "making / a slave".into(),
            )?;
            check(
                libc::mount(
                    c"microvm-jail".as_ptr(),
                    root_c.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"mode=0755,size=64k,nr_inodes=64".as_ptr().cast(),
                ),
                || format!("mounting a tmpfs on {}", root.display()),
            )?;
        }
        let mkdir = |path: &Path| {
            std::fs::create_dir(path).map_err(|source| JailError::Syscall {
                what: format!("creating {}", path.display()),
                source,
            })
        };
        // A bind of `source` on `target` (with the mounts under `source`
        // unless `flags` asks for restrictions: then only its own file
        // system, remounted with them).
        let bind = |source: &Path, target: &Path, flags: libc::c_ulong| {
            let (source_c, target_c) = (c_path(source), c_path(target));
            let recursive = if flags == 0 { libc::MS_REC } else { 0 };
            check(
                // SAFETY: as above.
                unsafe {
                    libc::mount(
                        source_c.as_ptr(),
                        target_c.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | recursive,
                        std::ptr::null(),
                    )
                },
                || format!("binding {} into the jail", source.display()),
            )?;
            if flags != 0 {
                check(
                    // SAFETY: as above.
                    unsafe {
                        libc::mount(
                            std::ptr::null(),
                            target_c.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REMOUNT | flags,
                            std::ptr::null(),
                        )
                    },
                    || format!("restricting {} in the jail", source.display()),
                )?;
            }
            Ok::<(), JailError>(())
        };
        if !fs.is_empty() {
            mkdir(&root.join("fs"))?;
            // The file server reaches extended attributes through
            // `/proc/self/fd/N`: a proc of our own PID namespace, showing
            // our own process only (`subset=pid`: no /proc/sys, no
            // /proc/sysrq-trigger, nothing global), read-only.
            // It also replaces the host's /proc in our namespace now: the
            // file server opens `/proc/self/fd` when it is created (before
            // the root changes), and a descriptor into the host's proc
            // would lead, by `..`, to /proc/sys and every process.
            match crate::devices::virtio::fs::server::raise_fd_limit() {
                Ok(limit) => tracing::debug!("virtio-fs: up to {limit} open files"),
                Err(e) => tracing::warn!("virtio-fs: raising the open-file limit: {e}"),
            }
            let proc_dir = root.join("proc");
            mkdir(&proc_dir)?;
            let proc_c = c_path(&proc_dir);
            check(
                // SAFETY: as above.
                unsafe {
                    libc::mount(
                        c"proc".as_ptr(),
                        proc_c.as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"subset=pid,hidepid=invisible".as_ptr().cast(),
                    )
                },
                || "mounting a proc of our own".into(),
            )?;
            bind(&proc_dir, Path::new("/proc"), 0)?;
        }
        for (index, share) in fs.iter_mut().enumerate() {
            let target = root.join("fs").join(index.to_string());
            mkdir(&target)?;
            bind(&share.dir, &target, 0)?;
            share.dir = target;
        }
        if let Some(vsock) = vsock {
            if let (Some(dir), Some(name)) = (vsock.uds_path.parent(), vsock.uds_path.file_name()) {
                let target = root.join("vsock");
                mkdir(&target)?;
                bind(
                    if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    },
                    &target,
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                )?;
                vsock.host_ports_path = Some(Path::new("/vsock").join(name));
            }
        }
        let kept: caps::CapsHashSet = if fs.is_empty() {
            caps::CapsHashSet::new()
        } else {
            FS_CAPS.into_iter().collect()
        };
        let _ = KEPT_CAPS.set(kept);
        Ok(Jail {
            root: root.to_path_buf(),
        })
    }

    /// Step 5 (see the module): after everything is open, the new root.
    pub fn enter(self) -> Result<(), JailError> {
        let root_c = c_path(&self.root);
        // SAFETY: (of the calls below) plain system calls on C strings and
        // structs that live across them.
        unsafe {
            check(libc::chdir(root_c.as_ptr()), || {
                format!("entering {}", self.root.display())
            })?;
            // The old root ends up under the new one, then is detached.
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
                || format!("pivot_root into {}", self.root.display()),
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), || {
                "detaching the host's file systems".into()
            })?;
            check(libc::chdir(c"/".as_ptr()), || "entering /".into())?;
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
                || "making the jail's root read-only".into(),
            )?;
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            check(libc::setrlimit(libc::RLIMIT_CORE, &no_core), || {
                "turning core dumps off".into()
            })?;
        }
        tracing::debug!(
            "jailed: pid, mount, network, IPC and UTS namespaces of our own; root {}; \
             capabilities kept {:?}; seccomp lists {:?}",
            self.root.display(),
            KEPT_CAPS.get(),
            seccomp::list_sizes()
        );
        Ok(())
    }
}

//! One sandbox = one microVM: start its VMM process, reach the guest agent
//! over hybrid vsock, and tear it all down (VMM process, sockets, state
//! directory) however the VM ends.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::cgroup::{CgroupError, VmmCgroup};
use crate::config::SandboxConfig;
use crate::hybrid_vsock::{self, ConnectError};
use crate::network::NetAttachment;
use protocols::vmm::{self, VmmArgs};

/// The vsock socket, in a directory of its own: a jailed VMM sees that
/// directory (for guest connections to host ports, `<socket>_PORT`) and
/// nothing else of the state directory.
const VSOCK_DIR: &str = "vsock";
const VSOCK_SOCKET: &str = "vsock/vsock.sock";
const VMM_LOG: &str = "vmm.log";
/// The most the runtime reads of the VMM's log or the console file: their
/// ends, where the reasons are.
pub const LOG_TAIL_BYTES: u64 = 64 << 10;

/// The last `max` bytes of the file at `path` (from the start of a line
/// when cut), lossily decoded; empty when it cannot be read.
pub fn read_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    // Whatever the guest appends meanwhile, no more than `max`.
    if file.take(max).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    if start > 0 {
        if let Some((_, whole_lines)) = text.split_once('\n') {
            return whole_lines.to_string();
        }
    }
    text.into_owned()
}
/// The empty directory the jailed VMM's root is mounted on (in its own
/// mount namespace only).
const JAIL_ROOT: &str = "root";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what} {path} does not exist")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("creating the sandbox directory {path}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the VMM {path}")]
    SpawnVmm {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM failed to start: {0}")]
    VmmFailed(String),
    #[error("the guest agent did not answer within {timeout:?}{console}")]
    AgentTimeout { timeout: Duration, console: String },
    #[error("the VM died ({0})")]
    VmDied(String),
    #[error("reaching the guest agent")]
    Connect(#[from] ConnectError),
    #[error("the VMM's cgroup")]
    Cgroup(#[from] CgroupError),
}

pub use protocols::{GUEST_SHARED_DIR, SHARED_FS_TAG};
/// The shared directory inside the state directory, when the config names none.
const SHARED_DIR: &str = "shared";
/// With late mounts (a pod): the private tree inside the state directory
/// where the host makes every mount and mount point, and which the guest
/// sees only through [`SHARED_DIR`], a read-only bind of it (as Kata's
/// `mounts/` and `shared/`).
const PRIVATE_DIR: &str = "mounts";

/// The private tree of the sandbox whose state directory is `state_dir`
/// (see [`SandboxConfig::late_mounts`]): where a container's mounts go.
pub fn private_share_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(PRIVATE_DIR)
}

/// The guest's (read-only) view of [`private_share_dir`].
pub fn guest_share_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(SHARED_DIR)
}

/// Where the overlays' upper layers live, inside the state directory (a
/// tmpfs of the VMM's mount namespace).
const LAYERS_DIR: &str = "layers";

/// One mount(2) to make in the VMM's namespace, as C strings built before fork.
struct PreparedMount {
    source: std::ffi::CString,
    target: std::ffi::CString,
    fstype: Option<std::ffi::CString>,
    flags: libc::c_ulong,
    data: Option<std::ffi::CString>,
    /// Directories to create first, with their modes (an overlay's upper
    /// and work dirs).
    dirs: Vec<(std::ffi::CString, libc::mode_t)>,
    /// `MOUNT_ATTR_*` set afterwards on the mount and every mount under it
    /// (a recursive bind's `nosuid,nodev`); 0: none.
    attr_set: u64,
}

type Binds = Vec<PreparedMount>;

fn c_path(path: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL byte")
}

/// Adds the virtio-fs share to the VMM's arguments, creates the mount
/// points of its binds and prepares the mounts.
fn prepare_share(
    config: &SandboxConfig,
    dir: &Path,
    vmm_args: &mut VmmArgs,
) -> Result<Binds, SandboxError> {
    let shared = match (&config.shared_dir, config.shared_binds.is_empty()) {
        (Some(shared), _) => shared.clone(),
        (None, true) if !config.late_mounts => return Ok(Vec::new()),
        (None, _) => dir.join(SHARED_DIR),
    };
    let state_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SandboxError::StateDir { path, source }
    };
    if config.shared_dir.is_none() {
        share_dir(&shared).map_err(state_error(&shared))?;
    }
    let layers = dir.join(LAYERS_DIR);
    let mut mounts = Vec::new();
    if config.shared_binds.iter().any(|b| b.copy_on_write) {
        std::fs::create_dir_all(&layers).map_err(state_error(&layers))?;
        mounts.push(PreparedMount {
            source: c"tmpfs".into(),
            target: c_path(&layers),
            fstype: Some(c"tmpfs".into()),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(c"mode=0700".into()),
            dirs: Vec::new(),
            attr_set: 0,
        });
    }
    for (index, bind) in config.shared_binds.iter().enumerate() {
        let meta = std::fs::metadata(&bind.source).map_err(|_| SandboxError::MissingFile {
            what: "shared path",
            path: bind.source.clone(),
        })?;
        let target = shared.join(&bind.target);
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(state_error(&target))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(state_error(parent))?;
            }
            std::fs::write(&target, b"").map_err(state_error(&target))?;
        }
        if bind.copy_on_write {
            let lower = bind.source.display().to_string();
            if !meta.is_dir() || lower.contains([',', ':']) {
                return Err(SandboxError::VmmFailed(format!(
                    "cannot layer over {lower}: it must be a directory whose path has no ',' or ':'"
                )));
            }
            let upper = layers.join(format!("{index}-upper"));
            let work = layers.join(format!("{index}-work"));
            let data = format!(
                "lowerdir={lower},upperdir={},workdir={}",
                upper.display(),
                work.display()
            );
            mounts.push(PreparedMount {
                source: c"overlay".into(),
                target: c_path(&target),
                fstype: Some(c"overlay".into()),
                flags: libc::MS_NOSUID | libc::MS_NODEV,
                data: Some(std::ffi::CString::new(data).expect("paths have no NUL byte")),
                // The overlay's root takes the upper dir's mode: the lower's.
                dirs: vec![
                    (
                        c_path(&upper),
                        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
                    ),
                    (c_path(&work), 0o700),
                ],
                attr_set: 0,
            });
        } else {
            mounts.push(PreparedMount {
                source: c_path(&bind.source),
                target: c_path(&target),
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
                dirs: Vec::new(),
                attr_set: libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
            });
        }
    }
    vmm_args.fs.push(vmm::Share {
        tag: SHARED_FS_TAG.into(),
        dir: shared,
    });
    Ok(mounts)
}

/// Adds `--net fd=N,mac=..,mtu=M` per tap and returns the fds the child
/// must inherit (their FD_CLOEXEC is cleared there only, so no other child
/// of a multi-threaded runtime gets them). A tap on fd 0-2 is moved up
/// first: the child's stdio setup would overwrite it.
fn pass_taps(taps: &mut [NetAttachment], vmm_args: &mut VmmArgs) -> Result<Vec<i32>, SandboxError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = Vec::with_capacity(taps.len());
    for attachment in taps.iter_mut() {
        if attachment.tap.as_raw_fd() <= 2 {
            // SAFETY: F_DUPFD_CLOEXEC makes a new fd we then own alone.
            let fd = unsafe { libc::fcntl(attachment.tap.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(SandboxError::VmmFailed(format!(
                    "moving a tap fd: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: `fd` was just created and is owned by nothing else.
            attachment.tap = unsafe { OwnedFd::from_raw_fd(fd) };
        }
        let fd = attachment.tap.as_raw_fd();
        vmm_args.net.push(attachment.vmm_nic(fd));
        fds.push(fd);
    }
    Ok(fds)
}

/// In the forked VMM, before exec: a mount namespace of its own (a slave of
/// ours) holding the shared mounts, so they disappear with the VMM.
fn bind_in_own_namespace(mounts: &Binds) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let ptr = |s: &Option<std::ffi::CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: (of the calls below) plain syscalls on C strings built before
    // fork, which outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ))?;
        for mount in mounts {
            for (dir, mode) in &mount.dirs {
                check(libc::mkdir(dir.as_ptr(), *mode))?;
                // mkdir's mode passes through the umask; set it exactly.
                check(libc::chmod(dir.as_ptr(), *mode))?;
            }
            check(libc::mount(
                mount.source.as_ptr(),
                mount.target.as_ptr(),
                ptr(&mount.fstype),
                mount.flags,
                ptr(&mount.data).cast(),
            ))?;
            if mount.attr_set != 0 {
                let mut attr: libc::mount_attr = std::mem::zeroed();
                attr.attr_set = mount.attr_set;
                check(libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    mount.target.as_ptr(),
                    libc::AT_RECURSIVE as libc::c_uint,
                    &attr as *const libc::mount_attr,
                    std::mem::size_of::<libc::mount_attr>(),
                ) as libc::c_int)?;
            }
        }
    }
    Ok(())
}

/// Makes `path` a directory only its owner may enter (0700), or checks
/// that the one there is a directory, not a link, and makes it so.
pub(crate) fn private_dir(path: &Path) -> std::io::Result<()> {
    dir_with_mode(path, 0o700)
}

/// A share's root (0711), inside a private state directory: other host
/// users cannot reach it anyway, and the guest sees its mode, where a
/// user-namespaced container's setup must pass through it to mount its
/// rootfs and volumes (0700 gave it EACCES). Not listable by others.
pub(crate) fn share_dir(path: &Path) -> std::io::Result<()> {
    dir_with_mode(path, SHARE_DIR_MODE)
}

/// The mode of the share's directories (see [`share_dir`]).
pub(crate) const SHARE_DIR_MODE: u32 = 0o711;

fn dir_with_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !std::fs::symlink_metadata(path)?.is_dir() {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The state directory `dir` the configuration names (a pod's, under
/// `/run/microvm`), made anew (0700; an existing one is refused, the
/// caller removes a crashed run's leftovers first), its missing parents
/// 0700 too.
fn fresh_state_dir(dir: &Path) -> Result<PathBuf, (PathBuf, std::io::Error)> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| (parent.to_path_buf(), e))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| (dir.to_path_buf(), e))?;
    Ok(dir.to_path_buf())
}

/// A state directory of its own under the temp dir, as mkdtemp(3) makes
/// one: `microvm-<pid>-XXXXXX`, a name nobody could foresee, 0700, and
/// never one that existed (another user's, with a `vmm.log` or
/// `vsock.sock` planted in it).
fn temp_state_dir() -> Result<PathBuf, (PathBuf, std::io::Error)> {
    use std::os::unix::ffi::OsStringExt;
    let template = std::env::temp_dir().join(format!(
        "microvm-{}-{}-XXXXXX",
        std::process::id(),
        SANDBOX_COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let fail = |e| (template.clone(), e);
    let mut bytes = std::ffi::CString::new(template.clone().into_os_string().into_vec())
        .map_err(|_| fail(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?
        .into_bytes_with_nul();
    // SAFETY: mkdtemp rewrites the X's of a NUL-terminated buffer we own.
    let made = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(fail(std::io::Error::last_os_error()));
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

static SANDBOX_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running microVM. Dropping it kills the VMM and removes its state.
pub struct Sandbox {
    vmm: Child,
    dir: PathBuf,
    console: Option<PathBuf>,
    exited: Option<ExitStatus>,
    /// The agent answered Shutdown: no guest process is left and the
    /// guest's file systems are synced, so the VMM may be killed at once.
    guest_quiesced: bool,
    /// The configuration's [`SandboxConfig::agent_unresponsive`].
    agent_unresponsive: Option<Duration>,
    /// The VMM's cgroup, removed after the VMM (see [`crate::cgroup`]).
    cgroup: Option<VmmCgroup>,
    /// Started with `--jail`: `vmm` is the jailed VMM's supervisor.
    jailed: bool,
}

impl Sandbox {
    /// Starts the VMM. The agent is reached with [`Sandbox::connect_agent`].
    ///
    /// The guest NICs' taps are taken out of `config.net` (whatever the
    /// outcome) and passed to the VMM as `--net fd=N,mac=..,mtu=M`; our
    /// copies are closed once it runs.
    pub fn start(config: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let mut taps = config.net.take();
        for (what, path) in [
            ("guest kernel", &config.kernel),
            ("guest initramfs", &config.initrd),
            ("VMM binary", &config.vmm),
        ] {
            if !path.is_file() {
                return Err(SandboxError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        let dir = match &config.state_dir {
            Some(dir) => fresh_state_dir(dir),
            None => temp_state_dir(),
        }
        .map_err(|(path, source)| SandboxError::StateDir { path, source })?;
        let log =
            std::fs::File::create(dir.join(VMM_LOG)).map_err(|source| SandboxError::StateDir {
                path: dir.clone(),
                source,
            })?;
        let mut vmm_args = VmmArgs {
            initrd: Some(config.initrd.clone()),
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            cmdline: config.extra_cmdline.clone(),
            console: match &config.console {
                Some(path) => vmm::Console::File(path.clone()),
                None => vmm::Console::Off,
            },
            vsock: Some(vmm::Vsock {
                uds: dir.join(VSOCK_SOCKET),
                guest_cid: vmm::DEFAULT_GUEST_CID,
            }),
            seccomp: config.seccomp,
            ..VmmArgs::new(&config.kernel)
        };
        let vsock_dir = dir.join(VSOCK_DIR);
        if let Err(source) = std::fs::create_dir(&vsock_dir) {
            remove_state(&dir);
            return Err(SandboxError::StateDir {
                path: vsock_dir,
                source,
            });
        }
        if config.jail {
            // The VMM mounts its root's tmpfs here, in its own namespace.
            let root = dir.join(JAIL_ROOT);
            if let Err(source) = std::fs::create_dir(&root) {
                remove_state(&dir);
                return Err(SandboxError::StateDir { path: root, source });
            }
            vmm_args.jail = Some(root);
        }
        if config.seccomp != crate::config::Seccomp::On {
            tracing::warn!(
                "the VMM's seccomp filters are {}: for debugging only, a guest that \
                 breaks into the VMM may then make any system call",
                config.seccomp.as_arg()
            );
        }
        let binds = match prepare_share(config, &dir, &mut vmm_args) {
            Ok(binds) => binds,
            Err(e) => {
                remove_state(&dir);
                return Err(e);
            }
        };
        if config.late_mounts {
            if let Err(e) = share_late_mounts(&dir.join(PRIVATE_DIR), &dir.join(SHARED_DIR)) {
                remove_state(&dir);
                return Err(e);
            }
        }
        let tap_fds = match pass_taps(&mut taps, &mut vmm_args) {
            Ok(fds) => fds,
            Err(e) => {
                remove_state(&dir);
                return Err(e);
            }
        };
        let mut command = Command::new(&config.vmm);
        command
            .args(vmm_args.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // memory: the VMM dies with the thread that started it, so a runtime
        // killed with SIGKILL leaves no VM behind.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if !binds.is_empty() {
            // SAFETY: unshare and mount are async-signal-safe syscalls; the
            // C strings they read were built before fork and live in `binds`.
            unsafe {
                command.pre_exec(move || bind_in_own_namespace(&binds));
            }
        }
        if !tap_fds.is_empty() {
            // SAFETY: fcntl is async-signal-safe; the fds are ours (the
            // taps, open until after spawn) and the list was built before
            // fork.
            unsafe {
                command.pre_exec(move || {
                    for fd in &tap_fds {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let cgroup_path = config.cgroup_path.clone().unwrap_or_else(|| {
            VmmCgroup::default_path(&dir.file_name().unwrap_or_default().to_string_lossy())
        });
        let cgroup = match VmmCgroup::create(&cgroup_path).and_then(|cgroup| {
            let joiner = cgroup.joiner()?;
            Ok((cgroup, joiner))
        }) {
            Ok((cgroup, joiner)) => {
                // SAFETY: the joiner only write(2)s to fds opened before
                // fork: async-signal-safe.
                unsafe {
                    command.pre_exec(move || joiner.join());
                }
                cgroup
            }
            Err(e) => {
                remove_state(&dir);
                return Err(e.into());
            }
        };
        let spawned = command.spawn();
        // The VMM has its copies now (or failed): ours must not keep the
        // taps alive.
        drop(taps);
        let vmm = match spawned {
            Ok(child) => child,
            Err(source) => {
                remove_state(&dir);
                return Err(SandboxError::SpawnVmm {
                    path: config.vmm.clone(),
                    source,
                });
            }
        };
        tracing::debug!(
            "VMM started (pid {}) in cgroup {}, jail {}, seccomp {}",
            vmm.id(),
            cgroup.cgroup_path().display(),
            if config.jail { "on" } else { "off" },
            config.seccomp.as_arg()
        );
        Ok(Sandbox {
            vmm,
            dir,
            console: config.console.clone(),
            exited: None,
            guest_quiesced: false,
            agent_unresponsive: config.agent_unresponsive,
            cgroup: Some(cgroup),
            jailed: config.jail,
        })
    }

    /// The directory the guest sees over virtio-fs (tag [`SHARED_FS_TAG`]),
    /// mounted at [`GUEST_SHARED_DIR`] in the guest.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join(SHARED_DIR)
    }

    /// The sandbox's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// How long the running guest may leave a health check unanswered.
    pub fn agent_unresponsive(&self) -> Option<Duration> {
        self.agent_unresponsive
    }

    /// The VMM's process id: with the jail, the VMM proper (PID 1 of its
    /// own PID namespace, the only child of the process we started, which
    /// stays as its supervisor), as soon as it exists; signals to it reach
    /// the VMM itself (SIGSTOP stops the guest), and its death ends the
    /// supervisor the same way. Else the process we started.
    pub fn vmm_pid(&self) -> u32 {
        let supervisor = self.vmm.id();
        if self.jailed {
            let children =
                std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().find_map(|p| p.parse().ok()) {
                return pid;
            }
        }
        supervisor
    }

    /// The VMM's exit status once it has ended.
    pub fn vmm_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.vmm.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Kills the VMM (of a guest found stuck, or at the end) and reaps it.
    pub fn kill(&mut self) {
        if self.vmm_exit().is_none() {
            let _ = self.vmm.kill();
            self.exited = self.vmm.wait().ok();
        }
    }

    /// What the VMM printed last (its errors, why it stopped), trimmed: at
    /// most the last [`LOG_TAIL_BYTES`] of its log, which a guest may have
    /// made it fill.
    pub fn vmm_log(&self) -> String {
        read_tail(&self.dir.join(VMM_LOG), LOG_TAIL_BYTES)
            .trim()
            .to_string()
    }

    fn console_tail(&self) -> String {
        let Some(path) = &self.console else {
            return " (rerun with --console FILE to see the guest's console)".into();
        };
        let text = read_tail(path, LOG_TAIL_BYTES);
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "; last console lines:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// Why the VM is gone, waiting up to `grace` for a dying VMM to finish
    /// exiting: its sockets close before its exit status exists, so a broken
    /// agent connection usually arrives a moment before the VMM's death.
    pub fn death_within(&mut self, grace: Duration) -> Option<SandboxError> {
        let deadline = Instant::now() + grace;
        loop {
            if let Some(death) = self.death() {
                return Some(death);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Why the VM is gone, if it is.
    pub fn death(&mut self) -> Option<SandboxError> {
        use std::os::unix::process::ExitStatusExt;
        let status = self.vmm_exit()?;
        let log = self.vmm_log();
        if let Some(signal) = status.signal() {
            if signal == libc::SIGSYS {
                let record = log
                    .lines()
                    .rev()
                    .find_map(|line| line.strip_prefix("microvm-vmm: killed by its seccomp filter"))
                    .unwrap_or("")
                    .to_string();
                return Some(SandboxError::VmDied(format!(
                    "the VMM was killed by its seccomp filter{record}"
                )));
            }
            let name = nix::sys::signal::Signal::try_from(signal)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| format!("signal {signal}"));
            return Some(SandboxError::VmDied(format!(
                "its VMM was killed by {name}{}",
                self.console_tail()
            )));
        }
        Some(if status.success() {
            let how = log
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("microvm-vmm: guest stopped: "))
                .unwrap_or("reset or panic")
                .to_string();
            SandboxError::VmDied(format!("the guest stopped: {how}{}", self.console_tail()))
        } else if log.is_empty() {
            SandboxError::VmDied(format!("VMM {status}"))
        } else {
            SandboxError::VmmFailed(log)
        })
    }

    /// Connects to the guest agent, retrying while the guest boots.
    pub fn connect_agent(&mut self, timeout: Duration) -> Result<UnixStream, SandboxError> {
        let deadline = Instant::now() + timeout;
        let uds = self.dir.join(VSOCK_SOCKET);
        loop {
            if let Some(death) = self.death() {
                return Err(death);
            }
            match hybrid_vsock::connect(&uds, protocols::AGENT_VSOCK_PORT, Duration::from_secs(5)) {
                Ok(stream) => {
                    tracing::debug!("agent connected");
                    return Ok(stream);
                }
                // Not listening yet, or the VMM has not created its socket yet.
                Err(ConnectError::Refused { .. }) | Err(ConnectError::Socket { .. }) => {}
                Err(other) => return Err(other.into()),
            }
            if Instant::now() > deadline {
                return Err(SandboxError::AgentTimeout {
                    timeout,
                    console: self.console_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Records that the agent answered Shutdown (see the agent API): the
    /// guest has nothing left to lose, [`Sandbox::stop`] need not wait.
    pub fn guest_quiesced(&mut self) {
        self.guest_quiesced = true;
    }

    /// Ends the VMM: at once when the agent answered Shutdown (waiting for
    /// the guest's own reset would only add its kernel's shutdown path to
    /// every run), else after waiting up to `grace` for it to end by itself
    /// (the agent resetting the guest). Returns its exit status.
    pub fn stop(mut self, grace: Duration) -> Option<ExitStatus> {
        if self.guest_quiesced {
            self.kill();
            return self.exited;
        }
        let deadline = Instant::now() + grace;
        while self.vmm_exit().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.exited
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
        remove_state(&self.dir);
    }
}

/// Sets up a pod's share (Kata's design): `private` becomes a mount point
/// of its own with shared propagation in our mount namespace, where the
/// shim makes every mount point and mount later; `shared`, what the VMM
/// serves to the guest, is a read-only (`nosuid,nodev,noexec`) bind of it
/// and its slave: what is mounted under `private` appears under `shared`
/// (with its own flags: a container's rootfs stays writable) and in the
/// VMM's namespace (a slave of ours), but the guest can make nothing in
/// the tree itself: no link or directory where the host makes its mount
/// points.
fn share_late_mounts(private: &Path, shared: &Path) -> Result<(), SandboxError> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |e: nix::Error| SandboxError::StateDir {
            path,
            source: e.into(),
        }
    };
    for dir in [private, shared] {
        share_dir(dir).map_err(|source| SandboxError::StateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let none = None::<&str>;
    let set_up = || -> Result<(), SandboxError> {
        mount(Some(private), private, none, MsFlags::MS_BIND, none).map_err(fail(private))?;
        mount(none, private, none, MsFlags::MS_SHARED, none).map_err(fail(private))?;
        mount(Some(private), shared, none, MsFlags::MS_BIND, none).map_err(fail(shared))?;
        mount(
            none,
            shared,
            none,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            none,
        )
        .map_err(fail(shared))?;
        mount(none, shared, none, MsFlags::MS_SLAVE, none).map_err(fail(shared))
    };
    set_up().inspect_err(|_| {
        for dir in [shared, private] {
            while crate::mountinfo::is_mount_point(dir) {
                if umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).is_err() {
                    break;
                }
            }
        }
    })
}

/// Removes a sandbox's state directory, detaching whatever is still mounted
/// under its shared directory and private tree first (a crashed shim's
/// leftovers included). Nothing is removed while something stays mounted
/// there: removing would reach into it.
pub fn remove_state(dir: &Path) {
    // Detaching the top mount takes every mount under it along.
    for mounted in [dir.join(SHARED_DIR), dir.join(PRIVATE_DIR)] {
        while crate::mountinfo::is_mount_point(&mounted) {
            if nix::mount::umount2(
                &mounted,
                nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
            )
            .is_err()
            {
                break;
            }
        }
    }
    let left = crate::mountinfo::mounts_under(dir);
    if !left.is_empty() {
        tracing::warn!(
            "not removing {}: still mounted there: {left:?}",
            dir.display()
        );
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::NetAttachment;

    #[test]
    fn only_the_tail_of_a_huge_log_is_read() {
        let dir = std::env::temp_dir().join(format!("microvm-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmm.log");
        let mut text = "a flood line from the guest\n".repeat(100_000);
        text.push_str("microvm-vmm: guest stopped: power off\n");
        std::fs::write(&path, &text).unwrap();
        let tail = read_tail(&path, 1000);
        assert!(tail.len() <= 1000, "{} bytes read", tail.len());
        assert!(tail.starts_with("a flood line"), "cut at a line: {tail:?}");
        assert!(tail.ends_with("guest stopped: power off\n"));
        std::fs::write(&path, "short\n").unwrap();
        assert_eq!(read_tail(&path, 1000), "short\n");
        assert_eq!(read_tail(&dir.join("missing"), 1000), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The VMM gets `--net fd=N,mac=..,mtu=..` with fd N open in it; the
    /// config gives its copy up.
    #[test]
    fn taps_reach_the_vmm_as_net_arguments() {
        let dir = std::env::temp_dir().join(format!("microvm-net-arg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("args");
        let vmm = dir.join("fake-vmm");
        std::fs::write(
            &vmm,
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do case $a in fd=*) n=${{a#fd=}}; n=${{n%%,*}}; \
                 echo \"$a $(readlink /proc/$$/fd/$n)\" >> {out}.tmp;; esac; done\n\
                 mv {out}.tmp {out}\nsleep 30\n",
                out = out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let asset = dir.join("asset");
        std::fs::write(&asset, b"").unwrap();
        let mut config =
            SandboxConfig::with_assets(Some(asset.clone()), Some(asset), Some(vmm)).unwrap();
        config.state_dir = Some(dir.join("state"));
        config.net = vec![NetAttachment {
            tap: std::fs::File::open("/dev/null").unwrap().into(),
            mac: [0x02, 0, 0, 0, 0xab, 0xcd],
            mtu: 1400,
        }]
        .into();
        let sandbox = Sandbox::start(&config).unwrap();
        assert!(config.net.is_empty(), "the config keeps no copy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        drop(sandbox);
        let _ = std::fs::remove_dir_all(&dir);
        let (arg, target) = text.trim().split_once(' ').unwrap_or_default();
        assert!(arg.starts_with("fd="), "{text:?}");
        assert!(arg.ends_with(",mac=02:00:00:00:ab:cd,mtu=1400"), "{text:?}");
        assert_eq!(target, "/dev/null", "the fd is open in the VMM: {text:?}");
    }

    /// A VMM that cannot be started is named, with its cause once.
    #[test]
    fn a_vmm_that_cannot_start_shows_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        // Not executable, even for root.
        let asset = dir.path().join("asset");
        std::fs::write(&asset, b"").unwrap();
        let mut config = SandboxConfig::with_assets(
            Some(asset.clone()),
            Some(asset.clone()),
            Some(asset.clone()),
        )
        .unwrap();
        config.state_dir = Some(dir.path().join("state"));
        let Err(err) = Sandbox::start(&config) else {
            panic!("a VMM without execute permission started");
        };
        assert!(matches!(err, SandboxError::SpawnVmm { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("starting the VMM {}", asset.display())
        );
        let text = protocols::error_chain(&err);
        assert_eq!(
            text,
            format!(
                "starting the VMM {}: Permission denied (os error 13)",
                asset.display()
            )
        );
    }
}

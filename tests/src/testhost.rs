//! The KVM test host: Debian's stock kernel under QEMU/TCG with an emulated
//! AMD-V CPU (`-cpu max,+svm,+npt,-erms,-fsrm`), so `kvm_amd` gives a genuine `/dev/kvm`
//! on machines whose own `/dev/kvm` is PVM or missing.
//!
//! The host's root file system is shared read-only over 9p and made writable
//! inside with a tmpfs overlay, so host binaries (ours, QEMU, containerd…) run
//! in the test host unchanged. Commands travel over one virtio-serial port,
//! multiplexed by channel (see [`crate::wire`]). A [`Supervisor`] owns the
//! QEMU process and serves clients on a Unix socket in its state directory.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rootfs_builder::cpio::Archive;

use crate::wire::{Frame, Kind, SpawnRequest, HEARTBEAT_INTERVAL};

/// The test host's CPU: AMD-V with nested paging, without ERMS and FSRM.
/// TCG runs `rep movsb`/`rep stosb` one byte per iteration, so a CPU that
/// advertises fast string moves makes the test host's kernel — and, through
/// KVM's CPUID, its guests' kernels — copy and clear memory a byte at a
/// time (page cache reads 291 MB/s instead of 1.2 GB/s; `microvm run --
/// true` 3.6-5.3 s instead of 2.0-2.6 s). Without them they move 8 bytes
/// per iteration, as real CPUs effectively do with either instruction.
pub const TEST_HOST_CPU: &str = "max,+svm,+npt,-erms,-fsrm";

/// How QEMU runs the test host's vCPUs: a thread per vCPU (MTTCG).
pub const TEST_HOST_ACCEL: &str = "tcg,thread=multi,tb-size=512";

/// The test host's vCPUs. One: with two, nested SVM under load sometimes
/// broke the test host's kernel around inter-processor interrupts sent
/// while a vCPU ran a guest (a reschedule IPI recursing right after VMRUN
/// until the kernel stack overflowed, or soft lockups of both CPUs); and a
/// single TCG thread for two vCPUs was several times slower.
pub const TEST_HOST_CPUS: u32 = 1;

/// Name of the virtio-serial port that carries commands.
pub const PORT_NAME: &str = "microvm.testhost";
/// 9p mount tag of the shared host root.
pub const HOST_ROOT_TAG: &str = "hostroot";
/// The socket clients connect to, inside the state directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Written into the state directory once the test host accepts commands.
pub const READY_FILE: &str = "ready";
const CONSOLE_LOG: &str = "console.log";
const QEMU_PORT_SOCKET: &str = "qemu-port.sock";

/// Modules the test host loads before it mounts its root: 9p over virtio-pci,
/// overlayfs, the command port, and KVM with what runs guests (tun, vhost).
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "virtio_console",
    "virtio_rng",
    "kvm_amd",
    "tun",
    "vhost_net",
    "vhost_vsock",
    // Pod networking: CNI's bridge plugin and veth pairs, the tc redirects
    // between a pod's veth and its VM's tap, dummy links for unit tests.
    "veth",
    "bridge",
    "dummy",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
];

#[derive(Debug, thiserror::Error)]
pub enum TestHostError {
    #[error("{0}")]
    Missing(String),
    #[error("preparing the test host: {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("resolving test-host modules: {0}")]
    Modules(String),
    #[error("the test host did not come up: {reason}\n--- last {} console lines ({console}) ---\n{tail}", tail.lines().count())]
    Boot {
        reason: String,
        console: PathBuf,
        tail: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> TestHostError {
    let context = context.into();
    move |source| TestHostError::Io { context, source }
}

/// How to boot a test host.
#[derive(Debug, Clone)]
pub struct Config {
    /// Its PID 1: the static `testhost-init`.
    pub init: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub boot_timeout: Duration,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
    /// Where Debian's kernel packages put their files ("/" normally).
    pub system_root: PathBuf,
}

impl Config {
    pub fn new(init: PathBuf) -> Self {
        Self {
            init,
            memory_mib: 6144,
            cpus: TEST_HOST_CPUS,
            boot_timeout: Duration::from_secs(180),
            extra_cmdline: String::new(),
            system_root: PathBuf::from("/"),
        }
    }
}

/// Debian's test-host kernel: `/boot/vmlinuz-RELEASE` with its modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKernel {
    pub image: PathBuf,
    pub release: String,
    pub modules: PathBuf,
}

/// Finds the newest `linux-image-amd64` kernel under `root` whose modules are
/// installed and indexed (modules.dep).
pub fn find_host_kernel(root: &Path) -> Result<HostKernel, TestHostError> {
    let boot = root.join("boot");
    let missing = || {
        TestHostError::Missing(format!(
            "no Debian kernel with modules in {}: install linux-image-amd64 (apt-get install linux-image-amd64)",
            boot.display()
        ))
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(&boot).map_err(|_| missing())? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(release) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        let modules = root.join("lib/modules").join(release);
        if modules.join("modules.dep").is_file() {
            found.push(HostKernel {
                image: entry.path(),
                release: release.to_string(),
                modules,
            });
        } else if modules.is_dir() {
            return Err(TestHostError::Missing(format!(
                "{} has no modules.dep: run `depmod {release}`",
                modules.display()
            )));
        }
    }
    found.sort_by_key(|kernel| version_key(&kernel.release));
    found.pop().ok_or_else(missing)
}

/// "6.1.0-56-amd64" → [6, 1, 0, 56, …] so releases sort numerically.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// The `.ko` files to load, in dependency order, for `names`. Uses the
/// module index (modules.dep) through `modprobe --show-depends`.
pub fn module_load_order(
    kernel: &HostKernel,
    system_root: &Path,
    names: &[&str],
) -> Result<Vec<PathBuf>, TestHostError> {
    let mut order: Vec<PathBuf> = Vec::new();
    for name in names {
        let output = Command::new("modprobe")
            .arg("-d")
            .arg(system_root)
            .arg("-S")
            .arg(&kernel.release)
            .arg("--show-depends")
            .arg(name)
            .output()
            .map_err(|e| TestHostError::Modules(format!("running modprobe (install kmod): {e}")))?;
        if !output.status.success() {
            return Err(TestHostError::Modules(format!(
                "module {name} of {}: {}",
                kernel.release,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            // "insmod /lib/modules/…/x.ko [params]" or "builtin x".
            let Some(path) = line.strip_prefix("insmod ") else {
                continue;
            };
            let path = PathBuf::from(path.split_whitespace().next().unwrap_or_default());
            if !order.contains(&path) {
                order.push(path);
            }
        }
    }
    Ok(order)
}

/// Writes the test host's initramfs: the init and its modules.
pub fn write_initramfs(
    config: &Config,
    kernel: &HostKernel,
    out: &Path,
) -> Result<(), TestHostError> {
    if !config.init.is_file() {
        return Err(TestHostError::Missing(format!(
            "test-host init {} is missing: build it with scripts/build.sh",
            config.init.display()
        )));
    }
    let modules = module_load_order(kernel, &config.system_root, MODULES)?;
    let mut archive = Archive::new();
    let cpio_err = |e: rootfs_builder::cpio::CpioError| TestHostError::Io {
        context: "building the test-host initramfs".into(),
        source: io::Error::other(e),
    };
    archive
        .add_host_file("init", &config.init)
        .map_err(cpio_err)?;
    archive
        .add_char_device("dev/console", 0o600, 5, 1)
        .map_err(cpio_err)?;
    let mut order = String::new();
    for (index, module) in modules.iter().enumerate() {
        // modprobe printed paths as seen from `system_root`.
        let relative = module.strip_prefix("/").unwrap_or(module);
        let source = config.system_root.join(relative);
        let file_name = format!(
            "{index:02}-{}",
            module.file_name().unwrap_or_default().to_string_lossy()
        );
        archive
            .add_host_file(&format!("modules/{file_name}"), &source)
            .map_err(cpio_err)?;
        order.push_str(&file_name);
        order.push('\n');
    }
    archive
        .add_file("modules/order", 0o644, order)
        .map_err(cpio_err)?;
    archive.write_file(out).map_err(cpio_err)
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|candidate| candidate.is_file())
}

/// The last `count` lines of a log file (empty if it cannot be read).
pub fn tail_lines(path: &Path, count: usize) -> String {
    let Ok(file) = fs::File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Where a supervisor whose test host died leaves its account of it: next to
/// the state directory, which is removed when the supervisor ends.
pub fn failure_file(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".failure");
    PathBuf::from(name)
}

/// What is known about a test host that went away or wedged: the
/// supervisor's failure file (waiting up to `wait` for it), else the tails of
/// its console and QEMU logs as they are now.
pub fn failure_report(dir: &Path, wait: Duration) -> String {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(report) = fs::read_to_string(failure_file(dir)) {
            return report;
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    format!(
        "--- last console lines ---\n{}\n--- QEMU said ---\n{}",
        tail_lines(&dir.join(CONSOLE_LOG), 60),
        tail_lines(&dir.join("qemu.log"), 20)
    )
}

type Routes = Arc<Mutex<HashMap<u32, Sender<Frame>>>>;

/// A booted test host: its QEMU process and the command port.
pub struct Supervisor {
    dir: PathBuf,
    qemu: Child,
    port: Arc<Mutex<UnixStream>>,
    routes: Routes,
    next_channel: AtomicU32,
    /// The guest's kernel release, as its Ready frame said.
    pub kernel_release: String,
    pub boot_time: Duration,
    port_closed: Arc<AtomicBool>,
}

impl Supervisor {
    /// Boots a test host with its state (sockets, console log) in `dir`,
    /// and waits until it accepts commands.
    pub fn boot(config: &Config, dir: &Path) -> Result<Supervisor, TestHostError> {
        let started = Instant::now();
        let qemu_binary = find_in_path("qemu-system-x86_64").ok_or_else(|| {
            TestHostError::Missing(
                "qemu-system-x86_64 is not on PATH: install Debian's qemu-system-x86".into(),
            )
        })?;
        let kernel = find_host_kernel(&config.system_root)?;
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let initramfs = dir.join("initramfs.cpio");
        write_initramfs(config, &kernel, &initramfs)?;

        let port_socket = dir.join(QEMU_PORT_SOCKET);
        let _ = fs::remove_file(&port_socket);
        let port_listener = UnixListener::bind(&port_socket)
            .map_err(io_err(format!("binding {}", port_socket.display())))?;
        let console = dir.join(CONSOLE_LOG);
        let qemu_log =
            fs::File::create(dir.join("qemu.log")).map_err(io_err("creating qemu.log"))?;
        let cmdline = format!(
            "console=ttyS0 panic=-1 loglevel=4 mitigations=off {}",
            config.extra_cmdline
        );
        let mut command = Command::new(qemu_binary);
        command
            .args(["-machine", "q35", "-accel", TEST_HOST_ACCEL])
            .args(["-cpu", TEST_HOST_CPU])
            .args(["-smp", &config.cpus.to_string(), "-m", &config.memory_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&kernel.image)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", cmdline.trim()])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-virtfs")
            .arg(format!(
                "local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
            ))
            .args(["-device", "virtio-rng-pci", "-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!("socket,id=port,path={}", port_socket.display()))
            .args(["-device", &format!("virtserialport,chardev=port,name={PORT_NAME}")])
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone().map_err(io_err("qemu.log"))?)
            .stderr(qemu_log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // memory; QEMU then dies with the thread that started it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut qemu = command
            .spawn()
            .map_err(io_err("starting qemu-system-x86_64"))?;

        let fail = |qemu: &mut Child, reason: String| {
            let _ = qemu.kill();
            let _ = qemu.wait();
            let qemu_said = tail_lines(&dir.join("qemu.log"), 10);
            TestHostError::Boot {
                reason: if qemu_said.is_empty() {
                    reason
                } else {
                    format!("{reason}; QEMU said: {qemu_said}")
                },
                console: console.clone(),
                tail: tail_lines(&console, 50),
            }
        };

        // QEMU connects to the port socket while it starts.
        let port = match accept_within(&port_listener, &mut qemu, Duration::from_secs(30)) {
            Ok(stream) => stream,
            Err(reason) => return Err(fail(&mut qemu, reason)),
        };
        drop(port_listener);
        let _ = fs::remove_file(&port_socket);

        let routes: Routes = Arc::default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let port_closed = Arc::new(AtomicBool::new(false));
        {
            let reader = port
                .try_clone()
                .map_err(io_err("cloning the port socket"))?;
            let routes = routes.clone();
            let port_closed = port_closed.clone();
            thread::spawn(move || route_guest_frames(reader, routes, ready_tx, port_closed));
        }
        let kernel_release = match wait_ready(&ready_rx, &mut qemu, config.boot_timeout) {
            Ok(release) => release,
            Err(reason) => return Err(fail(&mut qemu, reason)),
        };
        Ok(Supervisor {
            dir: dir.to_path_buf(),
            qemu,
            port: Arc::new(Mutex::new(port)),
            routes,
            next_channel: AtomicU32::new(1),
            kernel_release,
            boot_time: started.elapsed(),
            port_closed,
        })
    }

    fn send_to_guest(&self, frame: &Frame) -> io::Result<()> {
        let mut port = self.port.lock().unwrap_or_else(|p| p.into_inner());
        frame.write_to(&mut *port)
    }

    /// Serves clients on `dir/control.sock` until `stop` is set, QEMU ends,
    /// or a client asks for shutdown; then powers the test host off.
    pub fn serve(self, stop: Arc<AtomicBool>) -> Result<(), TestHostError> {
        let socket = self.dir.join(CONTROL_SOCKET);
        let _ = fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).map_err(io_err(format!("binding {}", socket.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("control socket"))?;
        fs::write(self.dir.join(READY_FILE), &self.kernel_release)
            .map_err(io_err("writing the ready file"))?;
        let this = Arc::new(self);
        let mut last_heartbeat = Instant::now();
        let result = loop {
            if stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            if last_heartbeat.elapsed() >= HEARTBEAT_INTERVAL {
                last_heartbeat = Instant::now();
                if let Err(e) = this.send_to_guest(&Frame::new(0, Kind::Heartbeat, b"")) {
                    tracing::debug!("heartbeat: {e}");
                }
            }
            if this.port_closed.load(Ordering::SeqCst) {
                let error = TestHostError::Boot {
                    reason: format!(
                        "the test host went away (its command port closed; QEMU {})",
                        this.qemu_status(Duration::from_secs(3))
                    ),
                    console: this.dir.join(CONSOLE_LOG),
                    tail: failure_report(&this.dir, Duration::ZERO),
                };
                let _ = fs::write(failure_file(&this.dir), error.to_string());
                break Err(error);
            }
            match listener.accept() {
                Ok((client, _)) => {
                    let this = this.clone();
                    let stop = stop.clone();
                    thread::spawn(move || {
                        if let Err(e) = this.serve_client(client, &stop) {
                            tracing::debug!("client: {e}");
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(50))
                }
                Err(e) => break Err(io_err("accepting clients")(e)),
            }
        };
        drop(listener);
        let _ = fs::remove_file(&socket);
        let _ = fs::remove_file(this.dir.join(READY_FILE));
        // Client threads may still hold references; shut down through the shared handle.
        this.power_off();
        result
    }

    /// How QEMU ended, waiting up to `wait` for it (without reaping it).
    fn qemu_status(&self, wait: Duration) -> String {
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        let pid = nix::unistd::Pid::from_raw(self.qemu.id() as i32);
        let deadline = Instant::now() + wait;
        loop {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            match waitid(Id::Pid(pid), flags) {
                Ok(WaitStatus::Exited(_, code)) => return format!("exited with status {code}"),
                Ok(WaitStatus::Signaled(_, signal, _)) => return format!("was killed by {signal}"),
                Ok(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Ok(_) => return format!("still runs after {wait:?}"),
                Err(e) => return format!("status unknown: {e}"),
            }
        }
    }

    fn power_off(&self) {
        let _ = self.send_to_guest(&Frame::new(0, Kind::Shutdown, Vec::new()));
        let pid = self.qemu.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    thread::sleep(Duration::from_millis(50))
                }
                _ => return,
            }
        }
        tracing::warn!("test host did not power off within 10 s; killing QEMU");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }

    fn serve_client(&self, client: UnixStream, stop: &AtomicBool) -> io::Result<()> {
        client.set_nonblocking(false)?;
        let mut reader = client.try_clone()?;
        let Some(first) = Frame::read_from(&mut reader)? else {
            return Ok(());
        };
        match first.kind {
            Kind::Shutdown => {
                stop.store(true, Ordering::SeqCst);
                return Ok(());
            }
            Kind::Spawn => {}
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("client began with {other:?} instead of Spawn"),
                ))
            }
        }
        let channel = self.next_channel.fetch_add(1, Ordering::SeqCst);
        let (to_client, from_guest) = mpsc::channel();
        self.routes.lock().unwrap().insert(channel, to_client);
        let writer = thread::spawn(move || forward_to_client(client, from_guest));
        self.send_to_guest(&Frame::new(channel, Kind::Spawn, first.payload))?;
        loop {
            match Frame::read_from(&mut reader) {
                Ok(Some(frame)) if matches!(frame.kind, Kind::Stdin | Kind::Signal) => {
                    self.send_to_guest(&Frame::new(channel, frame.kind, frame.payload))?;
                }
                Ok(Some(frame)) => tracing::debug!("ignoring {:?} from a client", frame.kind),
                // The client left (or broke): if its command still runs, kill it.
                Ok(None) | Err(_) => break,
            }
        }
        if self.routes.lock().unwrap().contains_key(&channel) {
            let _ = self.send_to_guest(&Frame::new(
                channel,
                Kind::Signal,
                (libc::SIGKILL).to_le_bytes().to_vec(),
            ));
        }
        let _ = writer.join();
        Ok(())
    }
}

/// Sends a command's frames to its client, as channel 0, until it ends.
fn forward_to_client(mut client: UnixStream, frames: Receiver<Frame>) {
    for mut frame in frames {
        let last = matches!(frame.kind, Kind::Exit | Kind::SpawnFailed);
        frame.channel = 0;
        if frame.write_to(&mut client).is_err() || last {
            break;
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Both);
}

/// Reads the command port and hands each frame to its command's client.
fn route_guest_frames(
    mut port: UnixStream,
    routes: Routes,
    ready: Sender<String>,
    closed: Arc<AtomicBool>,
) {
    loop {
        match Frame::read_from(&mut port) {
            Ok(Some(frame)) if frame.kind == Kind::Ready => {
                let _ = ready.send(String::from_utf8_lossy(&frame.payload).into_owned());
            }
            Ok(Some(frame)) => {
                let last = matches!(frame.kind, Kind::Exit | Kind::SpawnFailed);
                let mut routes = routes.lock().unwrap();
                let route = if last {
                    routes.remove(&frame.channel)
                } else {
                    routes.get(&frame.channel).cloned()
                };
                if let Some(route) = route {
                    let _ = route.send(frame);
                }
            }
            Ok(None) => {
                tracing::warn!("the test host closed its command port");
                break;
            }
            Err(e) => {
                tracing::warn!("reading the test host's command port: {e}");
                break;
            }
        }
    }
    closed.store(true, Ordering::SeqCst);
    // Dropping every route ends each client's stream: the command is gone.
    routes.lock().unwrap().clear();
}

fn qemu_exited(qemu: &mut Child) -> Option<String> {
    match qemu.try_wait() {
        Ok(Some(status)) => Some(format!("QEMU exited ({status}) during boot")),
        Ok(None) => None,
        Err(e) => Some(format!("cannot wait for QEMU: {e}")),
    }
}

fn accept_within(
    listener: &UnixListener,
    qemu: &mut Child,
    timeout: Duration,
) -> Result<UnixStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accepting QEMU's port connection: {e}")),
        }
        if let Some(reason) = qemu_exited(qemu) {
            return Err(reason);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "QEMU did not connect its command port within {timeout:?}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_ready(
    ready: &Receiver<String>,
    qemu: &mut Child,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match ready.recv_timeout(Duration::from_millis(100)) {
            Ok(release) => return Ok(release),
            Err(RecvTimeoutError::Disconnected) => {
                // The port closes when QEMU exits: report the exit if it follows.
                for _ in 0..40 {
                    if let Some(reason) = qemu_exited(qemu) {
                        return Err(reason);
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                return Err("the command port closed before the test host was ready".into());
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some(reason) = qemu_exited(qemu) {
            return Err(reason);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting for the test host to be ready"
            ));
        }
    }
}

/// Client side: connects to a running test host's control socket.
pub fn connect(dir: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(dir.join(CONTROL_SOCKET))
}

/// Asks the supervisor serving `dir` to power the test host off.
pub fn request_stop(dir: &Path) -> io::Result<()> {
    let mut stream = connect(dir)?;
    Frame::new(0, Kind::Shutdown, Vec::new()).write_to(&mut stream)
}

/// A request to run `argv` with the caller's environment and working dir.
pub fn spawn_request_here(argv: Vec<String>) -> SpawnRequest {
    SpawnRequest {
        argv,
        env: std::env::vars().collect(),
        cwd: std::env::current_dir()
            .ok()
            .map(|d| d.to_string_lossy().into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_newest_kernel_with_modules() {
        let root = std::env::temp_dir().join(format!("testhost-kernel-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("boot")).unwrap();
        assert!(
            matches!(find_host_kernel(&root), Err(TestHostError::Missing(m)) if m.contains("linux-image-amd64"))
        );
        for release in ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64"] {
            fs::write(root.join(format!("boot/vmlinuz-{release}")), b"").unwrap();
            fs::create_dir_all(root.join(format!("lib/modules/{release}"))).unwrap();
            fs::write(root.join(format!("lib/modules/{release}/modules.dep")), b"").unwrap();
        }
        let kernel = find_host_kernel(&root).unwrap();
        assert_eq!(kernel.release, "6.1.0-56-amd64");
        assert_eq!(kernel.image, root.join("boot/vmlinuz-6.1.0-56-amd64"));
        // A kernel whose modules were never indexed is named, not skipped silently.
        fs::remove_file(root.join("lib/modules/6.1.0-9-amd64/modules.dep")).unwrap();
        let err = find_host_kernel(&root).unwrap_err().to_string();
        assert!(err.contains("depmod 6.1.0-9-amd64"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_init_is_named() {
        let config = Config::new(PathBuf::from("/nonexistent/testhost-init"));
        let kernel = HostKernel {
            image: PathBuf::from("/boot/vmlinuz-x"),
            release: "x".into(),
            modules: PathBuf::from("/lib/modules/x"),
        };
        let err = write_initramfs(&config, &kernel, Path::new("/tmp/unused.cpio"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/testhost-init"), "{err}");
    }
}

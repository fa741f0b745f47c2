//! PID 1 of the KVM test host.
//!
//! As PID 1 it loads the modules packed in its initramfs (listed in
//! `/modules/order`), mounts the host's root file system (shared read-only over
//! 9p) under a tmpfs overlay, switches into it, mounts fresh /proc, /sys, /dev
//! and /run, then starts itself again as `testhost-init serve` and reaps
//! orphans until that server ends, when it powers the machine off.
//!
//! The server runs commands sent over the virtio-serial port named
//! [`PORT_NAME`], multiplexed by channel (see `microvm_tests::wire`).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{bail, Context, Result};
use microvm_tests::testhost::{HOST_ROOT_TAG, PORT_NAME};
use microvm_tests::wire::{ExitStatus, Frame, Kind, SpawnRequest};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{chdir, chroot, Pid};

fn main() {
    let serve = std::env::args().nth(1).as_deref() == Some("serve");
    if serve {
        if let Err(e) = serve_commands() {
            eprintln!("testhost-init serve: {}", protocols::error_chain(&*e));
            std::process::exit(1);
        }
        return;
    }
    if std::process::id() != 1 {
        eprintln!("testhost-init must run as PID 1 of the test host (or with 'serve')");
        std::process::exit(2);
    }
    if let Err(e) = boot() {
        eprintln!("testhost-init: {}", protocols::error_chain(&*e));
    }
    power_off();
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
    // Without ACPI power-off the kernel halts; -no-reboot QEMU then idles,
    // so fall back to a reset, which ends it.
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        thread::park();
    }
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating mount point {target}"))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .with_context(|| format!("mounting {fstype} {source} on {target} ({data:?})"))
}

fn boot() -> Result<()> {
    let none = MsFlags::empty();
    mount_fs("devtmpfs", "/dev", "devtmpfs", none, None)?;
    mount_fs("proc", "/proc", "proc", none, None)?;
    mount_fs("sysfs", "/sys", "sysfs", none, None)?;
    load_modules(Path::new("/modules"))?;
    tolerate_tsc_calibration()?;

    // The host's root, read-only over 9p, under a writable tmpfs overlay.
    mount_fs(
        HOST_ROOT_TAG,
        "/lower",
        "9p",
        MsFlags::MS_RDONLY,
        Some("trans=virtio,version=9p2000.L,msize=1048576,cache=loose"),
    )?;
    mount_fs("tmpfs", "/rw", "tmpfs", none, Some("mode=0755"))?;
    fs::create_dir_all("/rw/upper")?;
    fs::create_dir_all("/rw/work")?;
    mount_fs(
        "overlay",
        "/newroot",
        "overlay",
        none,
        Some("lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work"),
    )?;

    // switch_root: move the overlay onto / and enter it.
    chdir("/newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("moving the new root onto /")?;
    chroot(".").context("chroot into the new root")?;
    chdir("/")?;

    mount_fs("proc", "/proc", "proc", none, None)?;
    mount_fs("sysfs", "/sys", "sysfs", none, None)?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", none, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", none, None)?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        none,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("tmpfs", "/dev/shm", "tmpfs", none, Some("mode=1777"))?;
    mount_fs("tmpfs", "/run", "tmpfs", none, Some("mode=0755"))?;
    let _ = fs::remove_file("/dev/ptmx");
    std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx")?;
    // The host's /etc/mtab or /proc/self/fd links may point at host paths; give
    // programs the usual /dev/fd links.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    nix::unistd::sethostname("testhost")?;
    bring_up_loopback()?;

    let mut server = Command::new("/proc/self/exe")
        .arg("serve")
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .spawn()
        .context("starting the command server")?;
    let server_pid = Pid::from_raw(server.id() as i32);
    // Reap every orphan until the server itself ends.
    loop {
        match waitpid(None, None) {
            Ok(status) if status.pid() == Some(server_pid) => {
                eprintln!("testhost-init: command server ended ({status:?}), powering off");
                return Ok(());
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::ECHILD) => {
                let _ = server.wait();
                return Ok(());
            }
            Err(e) => bail!("waitpid: {e}"),
        }
    }
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Loads `dir/order`'s modules, one file name a line, in that order.
fn load_modules(dir: &Path) -> Result<()> {
    let order = fs::read_to_string(dir.join("order")).context("reading /modules/order")?;
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let file = File::open(&path).with_context(|| format!("opening module {name}"))?;
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => bail!("loading module {name}: {e}"),
        }
    }
    Ok(())
}

/// KVM gives guests the TSC rate the host had calibrated when kvm.ko
/// loaded, and when that differs from the host's current rate by more than
/// `kvm.tsc_tolerance_ppm` (250) it scales or "catches up" the guests' TSC,
/// which nested SVM under TCG cannot do: guest timers stall and VMs hang
/// (measured: every `microvm run` hung in a test host whose kernel refined
/// its TSC from 2598.094 to 2599.980 MHz, 726 ppm, after kvm loaded; with
/// the tolerance set to 0 every run hangs, at 250 a matching one works).
/// Under TCG the early and refined calibrations differ by up to ~0.1%, so
/// the test host tolerates 1%: guests run on the host's TSC and their
/// TSC-deadline timers are converted with at most that error.
fn tolerate_tsc_calibration() -> Result<()> {
    let path = "/sys/module/kvm/parameters/tsc_tolerance_ppm";
    fs::write(path, "10000").with_context(|| format!("writing {path}"))
}

fn bring_up_loopback() -> Result<()> {
    // SAFETY: a plain socket() call; the fd is owned by OwnedFd right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket for loopback setup");
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCSIFFLAGS,
            &request,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("bringing up lo");
    }
    Ok(())
}

/// The /dev node of the virtio-serial port called `name`.
fn find_port(name: &str) -> Result<PathBuf> {
    for entry in fs::read_dir("/sys/class/virtio-ports").context("listing virtio ports")? {
        let entry = entry?;
        if fs::read_to_string(entry.path().join("name"))
            .unwrap_or_default()
            .trim()
            == name
        {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    bail!("no virtio-serial port named {name}")
}

type Writer = Arc<Mutex<File>>;

fn send(writer: &Writer, frame: Frame) {
    let mut port = writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(e) = frame.write_to(&mut *port) {
        eprintln!("testhost-init: writing to the command port: {e}");
    }
}

/// What the reader needs to reach a running command.
struct Running {
    stdin: Sender<Vec<u8>>,
    process_group: Pid,
}

fn serve_commands() -> Result<()> {
    let port_path = find_port(PORT_NAME)?;
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&port_path)
        .with_context(|| format!("opening {}", port_path.display()))?;
    let mut reader = port.try_clone()?;
    let writer: Writer = Arc::new(Mutex::new(port));
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    send(
        &writer,
        Frame::new(0, Kind::Ready, release.trim().as_bytes()),
    );

    let running: Arc<Mutex<HashMap<u32, Running>>> = Arc::default();
    loop {
        let Some(frame) = Frame::read_from(&mut reader).context("reading the command port")? else {
            bail!("the host closed the command port");
        };
        match frame.kind {
            Kind::Spawn => match frame.parse_json::<SpawnRequest>() {
                Ok(request) => spawn_command(frame.channel, request, &writer, &running),
                Err(e) => send(
                    &writer,
                    Frame::new(
                        frame.channel,
                        Kind::SpawnFailed,
                        format!("bad request: {e}").as_bytes(),
                    ),
                ),
            },
            Kind::Stdin => {
                if let Some(command) = running.lock().unwrap().get(&frame.channel) {
                    let _ = command.stdin.send(frame.payload);
                }
            }
            Kind::Signal => {
                let signal = frame
                    .signal()
                    .map_err(anyhow::Error::from)
                    .and_then(|n| Signal::try_from(n).map_err(anyhow::Error::from));
                match signal {
                    Ok(signal) => {
                        if let Some(command) = running.lock().unwrap().get(&frame.channel) {
                            let _ = killpg(command.process_group, signal);
                        }
                    }
                    Err(e) => eprintln!("testhost-init: ignoring a bad signal frame: {e:#}"),
                }
            }
            Kind::Shutdown => return Ok(()),
            Kind::Heartbeat => {}
            other => eprintln!("testhost-init: ignoring unexpected {other:?} frame"),
        }
    }
}

fn spawn_command(
    channel: u32,
    request: SpawnRequest,
    writer: &Writer,
    running: &Arc<Mutex<HashMap<u32, Running>>>,
) {
    let Some((program, args)) = request.argv.split_first() else {
        send(
            writer,
            Frame::new(channel, Kind::SpawnFailed, "empty command line"),
        );
        return;
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .current_dir(request.cwd.as_deref().unwrap_or("/"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a signal or a kill reaches its children too.
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("cannot run {program:?}: {e}");
            send(writer, Frame::new(channel, Kind::SpawnFailed, message));
            return;
        }
    };
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>();
    running.lock().unwrap().insert(
        channel,
        Running {
            stdin: stdin_tx,
            process_group: Pid::from_raw(child.id() as i32),
        },
    );
    let mut stdin = child.stdin.take();
    thread::spawn(move || {
        // An empty chunk (or the channel's end) closes stdin.
        while let Ok(chunk) = stdin_rx.recv() {
            let Some(pipe) = stdin.as_mut() else { continue };
            if chunk.is_empty() || pipe.write_all(&chunk).is_err() {
                stdin = None;
            }
        }
    });
    let forward = |mut pipe: Box<dyn Read + Send>, kind: Kind| {
        let writer = writer.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => send(&writer, Frame::new(channel, kind, &buf[..n])),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
    };
    let stdout = forward(Box::new(child.stdout.take().unwrap()), Kind::Stdout);
    let stderr = forward(Box::new(child.stderr.take().unwrap()), Kind::Stderr);
    let writer = writer.clone();
    let running = running.clone();
    thread::spawn(move || {
        let _ = stdout.join();
        let _ = stderr.join();
        let status = match child.wait() {
            Ok(status) => ExitStatus::from(status),
            Err(_) => ExitStatus::Code(-1),
        };
        running.lock().unwrap().remove(&channel);
        send(&writer, Frame::json(channel, Kind::Exit, &status));
    });
}

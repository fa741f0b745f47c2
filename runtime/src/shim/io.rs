//! A process's stdio between containerd and the agent: containerd names a
//! FIFO (or a `file://` URI) per stream; one thread per stream copies the
//! agent's output into it, and containerd's stdin into the agent, until the
//! stream ends or the VM dies (which fails the pending agent calls).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use protocols::agent;
use protocols::agent_ttrpc::AgentServiceClient;

/// What containerd asked for, per stream; empty strings mean none.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    /// A TTY: stderr is merged into stdout by the pty.
    pub terminal: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("stdio {0:?}: only FIFOs, files and file:// URIs are supported")]
    Unsupported(String),
    #[error("opening stdio {path}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// Where an output stream goes: nowhere (drained all the same, so the
/// process never blocks on a full pipe) or an open FIFO or file.
fn open_output(uri: &str) -> Result<Option<File>, IoError> {
    if uri.is_empty() {
        return Ok(None);
    }
    let open_err = |source| IoError::Open {
        path: uri.to_string(),
        source,
    };
    if let Some(path) = uri.strip_prefix("file://") {
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent).map_err(open_err)?;
        }
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Some)
            .map_err(open_err);
    }
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.to_string()));
    }
    // containerd has the read side open already; read+write keeps the open
    // from blocking if it has not.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(uri)
        .map(Some)
        .map_err(open_err)
}

/// Checks the paths and starts copying the process's output (stdout, and
/// stderr unless it is a TTY). Returns the threads, which end at the
/// streams' ends.
pub fn start_output(
    client: &AgentServiceClient,
    container_id: &str,
    exec_id: &str,
    paths: &StdioPaths,
) -> Result<Vec<JoinHandle<()>>, IoError> {
    let stdout = open_output(&paths.stdout)?;
    let stderr = if paths.terminal {
        None
    } else {
        Some(open_output(&paths.stderr)?)
    };
    let request = agent::ReadStreamRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    let mut threads = vec![spawn_output(client.clone(), request.clone(), stdout, false)];
    if let Some(stderr) = stderr {
        threads.push(spawn_output(client.clone(), request, stderr, true));
    }
    Ok(threads)
}

fn spawn_output(
    client: AgentServiceClient,
    request: agent::ReadStreamRequest,
    mut out: Option<File>,
    stderr: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || loop {
        let chunk = protocols::read_output(&client, &request, stderr);
        match chunk {
            Ok(chunk) if !chunk.data.is_empty() => {
                if let Some(file) = out.as_mut() {
                    if let Err(e) = file.write_all(&chunk.data) {
                        tracing::debug!("{}: output dropped: {e}", request.container_id);
                        out = None;
                    }
                }
            }
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(
                    "{}/{}: output ended: {}",
                    request.container_id,
                    request.exec_id,
                    protocols::error_message(&e)
                );
                return;
            }
        }
    })
}

/// A process's stdin from containerd: its FIFO, copied into the process in
/// the guest by a thread of its own ([`Stdin::start`]).
///
/// The stream ends, and the process's stdin is closed in the guest, only
/// after every byte containerd wrote has been delivered: at the FIFO's
/// end-of-file (containerd's writers all closed, after at least one was
/// open), or at containerd's CloseIO ([`Stdin::close`]) once the FIFO holds
/// nothing more — containerd's writes that came before CloseIO are in it by
/// then. (CloseIO alone is not relied on: ctr sends none when its input
/// ended before the task was created, and it may come while data is still
/// in the FIFO.)
#[derive(Debug, Default)]
pub struct Stdin {
    /// The FIFO's read side, until [`Stdin::start`] hands it to the thread.
    fifo: Mutex<Option<File>>,
    /// Tells the thread of CloseIO or of the process's removal.
    control: Option<StdinControl>,
}

/// The copy thread's instructions: a state and a pipe that wakes it.
#[derive(Debug)]
struct StdinControl {
    state: Arc<AtomicU8>,
    wake_read: Mutex<Option<OwnedFd>>,
    wake_write: OwnedFd,
}

const COPYING: u8 = 0;
/// CloseIO: close once the FIFO is drained.
const CLOSE: u8 = 1;
/// The process went away: stop without closing.
const STOP: u8 = 2;

impl Stdin {
    /// Opens containerd's stdin FIFO `path` (none when empty) at once,
    /// without waiting for a writer.
    pub fn open(path: &str) -> Result<Self, IoError> {
        if path.is_empty() {
            return Ok(Self::default());
        }
        if path.contains("://") {
            return Err(IoError::Unsupported(path.to_string()));
        }
        let open_err = |source| IoError::Open {
            path: path.to_string(),
            source,
        };
        let fifo = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let (wake_read, wake_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| open_err(e.into()))?;
        Ok(Self {
            fifo: Mutex::new(Some(fifo)),
            control: Some(StdinControl {
                state: Arc::new(AtomicU8::new(COPYING)),
                wake_read: Mutex::new(Some(wake_read)),
                wake_write,
            }),
        })
    }

    /// Starts copying into the process `exec_id` of `container_id` in the
    /// guest, until the stream ends (see [`Stdin`]). Once only.
    pub fn start(&self, client: &AgentServiceClient, container_id: &str, exec_id: &str) {
        let (Some(fifo), Some(control)) = (lock(&self.fifo).take(), self.control.as_ref()) else {
            return;
        };
        let Some(wake) = lock(&control.wake_read).take() else {
            return;
        };
        let state = control.state.clone();
        let client = client.clone();
        let target = (container_id.to_string(), exec_id.to_string());
        std::thread::spawn(move || {
            let (container_id, exec_id) = (&target.0, &target.1);
            let end = copy_input(&fifo, &wake, &state, |data| {
                let request = agent::WriteStreamRequest {
                    container_id: container_id.clone(),
                    exec_id: exec_id.clone(),
                    data: data.to_vec(),
                    ..Default::default()
                };
                client
                    .write_stdin(protocols::unbounded_call(), &request)
                    .map(drop)
                    .map_err(|e| protocols::error_message(&e))
            });
            match end {
                InputEnd::Closed => close_stdin(&client, container_id, exec_id),
                InputEnd::Stopped => {}
                InputEnd::Failed(e) => tracing::debug!("{container_id}/{exec_id}: stdin: {e}"),
            }
        });
    }

    /// containerd's CloseIO: the process's stdin closes once what
    /// containerd wrote before it has been delivered.
    pub fn close(&self) {
        self.tell(CLOSE);
    }

    /// The process is gone: the copy stops (and a copy not yet started
    /// never will).
    pub fn stop(&self) {
        lock(&self.fifo).take();
        self.tell(STOP);
    }

    fn tell(&self, what: u8) {
        if let Some(control) = &self.control {
            // A stop outranks a close.
            control.state.fetch_max(what, Ordering::SeqCst);
            let _ = nix::unistd::write(&control.wake_write, &[what]);
        }
    }
}

/// How a stdin copy ended.
#[derive(Debug, PartialEq, Eq)]
enum InputEnd {
    /// Every byte was delivered: the process's stdin is to be closed.
    Closed,
    /// Told to stop.
    Stopped,
    /// The FIFO or the delivery failed.
    Failed(String),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies the (non-blocking) FIFO `fifo` into `deliver` until its end:
/// end-of-file once a writer had it open, or a CLOSE in `state` once the
/// FIFO is empty; a STOP ends it at once. `wake` is readable when `state`
/// changed.
fn copy_input(
    fifo: &File,
    wake: &OwnedFd,
    state: &AtomicU8,
    mut deliver: impl FnMut(&[u8]) -> Result<(), String>,
) -> InputEnd {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut fifo_reader = fifo;
    loop {
        match state.load(Ordering::SeqCst) {
            STOP => return InputEnd::Stopped,
            CLOSE => {
                // Drain what is there, then end.
                loop {
                    match fifo_reader.read(&mut buffer) {
                        Ok(0) => return InputEnd::Closed,
                        Ok(n) => {
                            if let Err(e) = deliver(&buffer[..n]) {
                                return InputEnd::Failed(e);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            return InputEnd::Closed
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return InputEnd::Failed(format!("reading the FIFO: {e}")),
                    }
                }
            }
            _ => {}
        }
        // The FIFO polls readable with data, or hung up once its last
        // writer closed (not before a first writer came: a read would then
        // say end-of-file too early).
        let mut fds = [
            PollFd::new(fifo.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return InputEnd::Failed(format!("polling the FIFO: {e}")),
        }
        let woken = fds[1].revents().is_some_and(|r| !r.is_empty());
        let fifo_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        if woken {
            let mut drained = [0u8; 16];
            while matches!(nix::unistd::read(wake.as_raw_fd(), &mut drained), Ok(n) if n > 0) {}
        }
        if !fifo_ready {
            continue;
        }
        match fifo_reader.read(&mut buffer) {
            Ok(0) => return InputEnd::Closed,
            Ok(n) => {
                if let Err(e) = deliver(&buffer[..n]) {
                    return InputEnd::Failed(e);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return InputEnd::Failed(format!("reading the FIFO: {e}")),
        }
    }
}

/// Tells the agent the process's stdin is at its end.
fn close_stdin(client: &AgentServiceClient, container_id: &str, exec_id: &str) {
    let request = agent::CloseStdinRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    if let Err(e) = client.close_stdin(protocols::quick_call(10), &request) {
        tracing::debug!(
            "{container_id}/{exec_id}: closing stdin: {}",
            protocols::error_message(&e)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unsupported_uris_are_named() {
        let err = open_output("binary:///usr/bin/logger").unwrap_err();
        assert!(
            err.to_string().contains("binary:///usr/bin/logger"),
            "{err}"
        );
    }

    #[test]
    fn file_uris_are_appended_to() {
        let dir = std::env::temp_dir().join(format!("shim-io-{}", std::process::id()));
        let path = dir.join("sub/log");
        let uri = format!("file://{}", path.display());
        open_output(&uri).unwrap().unwrap().write_all(b"a").unwrap();
        open_output(&uri).unwrap().unwrap().write_all(b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "ab");
        std::fs::remove_dir_all(dir).unwrap();
        assert!(open_output("").unwrap().is_none());
    }

    /// A FIFO in a fresh directory, its non-blocking read side, and a
    /// control for [`copy_input`].
    struct Fifo {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
        reader: File,
        state: Arc<AtomicU8>,
        wake: (OwnedFd, OwnedFd),
    }

    impl Fifo {
        fn new(name: &str) -> Fifo {
            let dir =
                std::env::temp_dir().join(format!("shim-stdin-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("stdin");
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
            let reader = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .unwrap();
            let wake = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
            Fifo {
                dir,
                path,
                reader,
                state: Arc::new(AtomicU8::new(COPYING)),
                wake,
            }
        }

        /// Runs the copy on a thread: what it delivered and how it ended.
        fn copy(self) -> (std::thread::JoinHandle<(Vec<u8>, InputEnd)>, Control) {
            let control = Control {
                state: self.state.clone(),
                wake: self.wake.1,
                path: self.path.clone(),
                dir: self.dir.clone(),
            };
            let (reader, wake, state) = (self.reader, self.wake.0, self.state);
            let thread = std::thread::spawn(move || {
                let mut got = Vec::new();
                let end = copy_input(&reader, &wake, &state, |data| {
                    got.extend_from_slice(data);
                    Ok(())
                });
                (got, end)
            });
            (thread, control)
        }
    }

    struct Control {
        state: Arc<AtomicU8>,
        wake: OwnedFd,
        path: std::path::PathBuf,
        dir: std::path::PathBuf,
    }

    impl Control {
        fn tell(&self, what: u8) {
            self.state.fetch_max(what, Ordering::SeqCst);
            nix::unistd::write(&self.wake, &[what]).unwrap();
        }

        fn writer(&self) -> File {
            OpenOptions::new().write(true).open(&self.path).unwrap()
        }
    }

    impl Drop for Control {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn stdin_waits_for_a_writer_and_ends_at_its_close_with_every_byte() {
        let (copy, control) = Fifo::new("eof").copy();
        // No writer yet: no premature end-of-file.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!copy.is_finished());
        let sent = data(3 * 1024 * 1024 + 17);
        let mut writer = control.writer();
        writer.write_all(&sent).unwrap();
        drop(writer);
        let (got, end) = copy.join().unwrap();
        assert_eq!(end, InputEnd::Closed);
        assert!(got == sent, "{} of {} bytes", got.len(), sent.len());
    }

    #[test]
    fn close_io_delivers_what_was_written_before_it_even_with_the_writer_open() {
        let (copy, control) = Fifo::new("closeio").copy();
        let sent = data(1024 * 1024 + 3);
        let mut writer = control.writer();
        // The writer stays open (as a client that keeps its end): CloseIO
        // after its last write must still deliver everything, then end.
        writer.write_all(&sent).unwrap();
        control.tell(CLOSE);
        let (got, end) = copy.join().unwrap();
        drop(writer);
        assert_eq!(end, InputEnd::Closed);
        assert!(got == sent, "{} of {} bytes", got.len(), sent.len());
    }

    #[test]
    fn close_io_before_any_writer_ends_an_empty_stdin() {
        let (copy, control) = Fifo::new("empty").copy();
        control.tell(CLOSE);
        assert_eq!(copy.join().unwrap(), (Vec::new(), InputEnd::Closed));
    }

    #[test]
    fn stop_ends_the_copy_without_closing() {
        let (copy, control) = Fifo::new("stop").copy();
        let mut writer = control.writer();
        writer.write_all(b"partial").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        control.tell(STOP);
        let (_, end) = copy.join().unwrap();
        assert_eq!(end, InputEnd::Stopped);
    }

    #[test]
    fn a_failed_delivery_ends_the_copy() {
        let fifo = Fifo::new("fail");
        let mut writer = OpenOptions::new().write(true).open(&fifo.path).unwrap();
        writer.write_all(b"x").unwrap();
        let end = copy_input(&fifo.reader, &fifo.wake.0, &fifo.state, |_| {
            Err("the process is gone".into())
        });
        let _ = std::fs::remove_dir_all(&fifo.dir);
        assert_eq!(end, InputEnd::Failed("the process is gone".into()));
    }
}

//! `cri exec`: what `crictl exec -i` / `kubectl exec -i` do. RuntimeService
//! Exec returns a URL on the CRI streaming server (containerd 1.6 serves
//! kubelet's `remotecommand` there); the client upgrades an HTTP/1.1 POST
//! to SPDY/3.1, opens one SPDY stream per stdio stream, sends stdin as DATA
//! frames and half-closes it (FLAG_FIN), copies stdout and stderr through
//! raw, and reads the exit status from the error stream.
//!
//! SPDY rather than the websocket `channel.k8s.io` protocols because those
//! (before v5, which containerd 1.6 does not have) cannot end stdin without
//! ending the whole connection. Framing is in [`crate::spdy`].
//!
//! The server's side, as containerd v1.6.20 has it
//! (`pkg/cri/streaming/remotecommand/httpstream.go`): it negotiates
//! `X-Stream-Protocol-Version`, answers `101 Switching Protocols`, then
//! waits (a bounded time) for as many streams as the Exec request asked
//! for, told apart by their `streamtype` header: error, stdin, stdout,
//! stderr, and resize with a TTY (v3 and later). It replies to each with
//! SYN_REPLY, runs the command, closes stdout and stderr (FLAG_FIN) when
//! the process's output ends, writes the status on the error stream (v4: a
//! JSON `metav1.Status`; v2/v3: an error message, nothing on success), then
//! resets the streams, sends GOAWAY and closes the connection.
//!
//! Two behaviours of containerd 1.6 a caller must know (both server-side;
//! kubectl and crictl meet them too): its stdin copy into the exec's FIFO
//! (`pkg/cri/io/exec_io.go`, `Attach`) blocks for good when the process
//! exits leaving stdin unread and the FIFO and pipe are full (the runc shim
//! keeps the pipe's read end open), and the exec then never finishes: seen
//! with `head -c 5` on 8 MiB; `--timeout` ends `cri` with [`EXIT_CLIENT`].
//! And with a TTY, the end of stdin closes the exec's output instead of the
//! process's stdin, so output after it may be lost.
//!
//! Threads: this one writes the streams' SYN_STREAMs and then waits for
//! events; a reader thread reads frames (stdout and stderr straight to ours,
//! the error stream into memory) and reports replies, resets, pings and the
//! end; a pump thread, with stdin, copies the input into DATA frames and
//! half-closes the stream. Writers share the socket through a mutex; the
//! reader never writes, so a server that stops reading (while the process
//! does not read stdin) never stops us reading its output.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::{json, Value};

use crate::args::Args;
use crate::spdy::{Frame, HeaderCompressor, FLAG_FIN};

/// `cri exec`'s exit status when cri itself fails (arguments, CRI, the
/// connection, the protocol, reading the input, writing the output).
pub const EXIT_CLIENT: i32 = 125;
/// Its exit status when the server reports that the exec failed without an
/// exit code (say, the command could not be started).
pub const EXIT_EXEC_FAILED: i32 = 126;

/// The remotecommand protocols offered, preferred first.
const V4: &str = "v4.channel.k8s.io";
const V3: &str = "v3.channel.k8s.io";
const V2: &str = "v2.channel.k8s.io";
const PROTOCOLS: [&str; 3] = [V4, V3, V2];

/// How long the server may take to accept the streams (kubelet's client
/// waits as long for each reply).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of stdin per DATA frame.
const CHUNK: usize = 32 * 1024;
/// The most of the error stream kept (a status is a few hundred bytes).
const ERROR_LIMIT: usize = 1 << 20;
/// The most of a response head, and of a refusal's body, read.
const HEAD_LIMIT: usize = 64 * 1024;

/// Runs `cri exec ARGS`: the command's exit status, or [`EXIT_CLIENT`] or
/// [`EXIT_EXEC_FAILED`] with a message on stderr. `timeout` bounds the whole
/// session.
pub fn main(socket: &Path, timeout: Duration, args: Args) -> i32 {
    let started = Instant::now();
    match run(socket, started + timeout, timeout, args) {
        Ok((code, summary)) => {
            if let Some(mut summary) = summary {
                summary["elapsed_ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
                eprintln!("{summary}");
            }
            code
        }
        Err(e) => {
            eprintln!("cri exec: {e:#}");
            EXIT_CLIENT
        }
    }
}

/// The exit status, and with `--verbose` the summary for stderr.
fn run(
    socket: &Path,
    deadline: Instant,
    timeout: Duration,
    args: Args,
) -> Result<(i32, Option<Value>)> {
    let options = Options::parse(args)?;
    let input = match &options.stdin {
        None => None,
        Some(name) if name == "-" => Some(Box::new(io::stdin()) as Box<dyn Read + Send>),
        Some(name) => Some(Box::new(
            std::fs::File::open(name).with_context(|| format!("opening {name}"))?,
        ) as Box<dyn Read + Send>),
    };
    let url = exec_url(socket, options.request(), timeout)?;
    let session = stream(&url, options.tty, input, deadline)?;
    let (code, failure) = match exit_status(&session.protocol, &session.error)? {
        Status::Exited(code) => (code, None),
        Status::Failed(message) => {
            eprintln!("cri exec: {message}");
            (EXIT_EXEC_FAILED, Some(message))
        }
    };
    let summary = options.verbose.then(|| {
        json!({
            "exit_code": code,
            "error": failure,
            "protocol": session.protocol,
            "url": url,
            "stdin_bytes": session.stdin_bytes,
            "stdin_closed": session.stdin_closed,
            "stdin_error": session.stdin_error,
            "stdout_bytes": session.stdout_bytes,
            "stderr_bytes": session.stderr_bytes,
        })
    });
    Ok((code, summary))
}

/// `exec [--tty] [--stdin FILE|-] [--verbose] ID -- CMD...`
#[derive(Debug, PartialEq)]
struct Options {
    id: String,
    cmd: Vec<String>,
    tty: bool,
    /// A file, or `-` for cri's own stdin.
    stdin: Option<String>,
    verbose: bool,
}

impl Options {
    fn parse(mut args: Args) -> Result<Options> {
        let tty = args.switch("tty");
        let verbose = args.switch("verbose");
        let stdin = args.value("stdin");
        if stdin.as_deref() == Some("") {
            bail!("--stdin needs a file name, or - for cri's stdin");
        }
        let id = args.positional("a container id")?;
        let cmd = std::mem::take(&mut args.command);
        if cmd.is_empty() {
            bail!("exec needs a command after --");
        }
        args.finish()?;
        Ok(Options {
            id,
            cmd,
            tty,
            stdin,
            verbose,
        })
    }

    /// The Exec request: stdout always, stderr unless there is a TTY (which
    /// merges it into stdout; CRI refuses both).
    fn request(&self) -> cri::ExecRequest {
        cri::ExecRequest {
            container_id: self.id.clone(),
            cmd: self.cmd.clone(),
            tty: self.tty,
            stdin: self.stdin.is_some(),
            stdout: true,
            stderr: !self.tty,
        }
    }
}

/// RuntimeService.Exec: the streaming URL.
fn exec_url(socket: &Path, request: cri::ExecRequest, timeout: Duration) -> Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let channel = crate::connect(socket).await?;
        let mut client = RuntimeServiceClient::new(channel);
        let answer = tokio::time::timeout(timeout, client.exec(request))
            .await
            .map_err(|_| anyhow!("Exec took longer than {timeout:?}"))?
            .map_err(crate::status)
            .context("Exec")?;
        Ok(answer.into_inner().url)
    })
}

/// What a session brought.
#[derive(Debug, Default)]
struct Session {
    protocol: String,
    /// What the error stream carried.
    error: Vec<u8>,
    stdin_bytes: u64,
    /// Whether stdin was half-closed.
    stdin_closed: bool,
    /// Why sending stdin stopped short, if it did.
    stdin_error: Option<String>,
    stdout_bytes: u64,
    stderr_bytes: u64,
}

/// The SPDY streams a session opens, by id (the client's are odd, in the
/// order opened).
#[derive(Debug, Clone, PartialEq)]
struct Streams {
    error: u32,
    stdin: Option<u32>,
    stdout: u32,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl Streams {
    /// The error stream first, as kubelet's client opens them; a resize
    /// stream only with a TTY and a protocol that has one (v3, v4).
    fn new(protocol: &str, stdin: bool, tty: bool) -> Streams {
        let mut next = 1;
        let mut id = || {
            let id = next;
            next += 2;
            id
        };
        let error = id();
        let stdin = stdin.then(&mut id);
        let stdout = id();
        let stderr = (!tty).then(&mut id);
        let resize = (tty && protocol != V2).then(&mut id);
        Streams {
            error,
            stdin,
            stdout,
            stderr,
            resize,
        }
    }

    /// Every stream with its `streamtype`, in the order to open them.
    fn all(&self) -> Vec<(u32, &'static str)> {
        let mut all = vec![(self.error, "error")];
        all.extend(self.stdin.map(|id| (id, "stdin")));
        all.push((self.stdout, "stdout"));
        all.extend(self.stderr.map(|id| (id, "stderr")));
        all.extend(self.resize.map(|id| (id, "resize")));
        all
    }

    fn name(&self, id: u32) -> &'static str {
        self.all()
            .into_iter()
            .find(|&(i, _)| i == id)
            .map_or("unknown", |(_, name)| name)
    }
}

/// The sending side of the connection, shared by the threads that write.
struct Writer {
    socket: TcpStream,
    headers: HeaderCompressor,
}

impl Writer {
    fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.socket.write_all(&frame.encode())
    }

    /// SYN_STREAM for a stream of type `kind`.
    fn open(&mut self, id: u32, kind: &str) -> io::Result<()> {
        let headers = self.headers.compress(&[("streamtype", kind)])?;
        self.send(&Frame::SynStream {
            stream: id,
            associated: 0,
            priority: 0,
            flags: 0,
            headers,
        })
    }
}

fn lock(writer: &Mutex<Writer>) -> MutexGuard<'_, Writer> {
    writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the reader and pump threads report.
enum Event {
    /// The server accepted a stream.
    Replied(u32),
    /// The server reset a stream (with this status).
    Reset(u32, u32),
    /// The server pinged (to be echoed).
    Ping(u32),
    /// The input ended (Ok: stdin was half-closed) or failed.
    Input(InputEnd),
    /// The connection ended, or reading it or writing our output failed.
    Finished(Result<Received>),
}

enum InputEnd {
    /// All of it went out, and the FIN after it.
    Closed,
    /// Reading the input failed: the process must not see a short stdin
    /// as its end.
    ReadFailed(io::Error),
    /// Sending failed: the server is gone, or the process ended without
    /// reading all of its stdin and the server closed the connection.
    WriteFailed(io::Error),
}

/// What the reader thread saw.
#[derive(Debug, Default)]
struct Received {
    error: Vec<u8>,
    stdout_bytes: u64,
    stderr_bytes: u64,
}

/// The streaming part: connects to `url`, upgrades to SPDY, runs the
/// streams until the server is done.
fn stream(
    url: &str,
    tty: bool,
    input: Option<Box<dyn Read + Send>>,
    deadline: Instant,
) -> Result<Session> {
    let (authority, path) = split_url(url)?;
    let socket = TcpStream::connect(&authority)
        .with_context(|| format!("connecting to the streaming server {authority}"))?;
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(time_left(deadline, "the upgrade")?))?;
    let mut conn = BufReader::new(socket.try_clone()?);
    let mut out = socket;
    out.write_all(upgrade_request(&authority, &path).as_bytes())
        .context("sending the upgrade request")?;
    let protocol = read_upgrade_response(&mut conn)?;
    conn.get_ref().set_read_timeout(None)?;

    let streams = Streams::new(&protocol, input.is_some(), tty);
    let writer = Arc::new(Mutex::new(Writer {
        socket: out,
        headers: HeaderCompressor::default(),
    }));
    {
        let mut w = lock(&writer);
        for (id, kind) in streams.all() {
            w.open(id, kind)
                .with_context(|| format!("opening the {kind} stream"))?;
        }
    }

    let (events, rx) = mpsc::channel();
    {
        let events = events.clone();
        let streams = streams.clone();
        thread::spawn(move || {
            let result = read_frames(conn, &streams, &events);
            let _ = events.send(Event::Finished(result));
        });
    }

    // Each stream must be accepted before data goes on it.
    let accept_by = deadline.min(Instant::now() + REPLY_TIMEOUT);
    let mut waiting: Vec<u32> = streams.all().into_iter().map(|(id, _)| id).collect();
    while !waiting.is_empty() {
        match next_event(&rx, accept_by, "accepting the streams")? {
            Event::Replied(id) => waiting.retain(|&w| w != id),
            Event::Reset(id, status) => bail!(
                "the server refused the {} stream (RST_STREAM status {status})",
                streams.name(id)
            ),
            Event::Ping(id) => pong(&writer, id)?,
            Event::Input(_) => {}
            Event::Finished(result) => {
                result?;
                bail!("the streaming server closed the connection before accepting the streams");
            }
        }
    }

    if let (Some(id), Some((width, height))) = (streams.resize, terminal_size()) {
        let size = json!({ "Width": width, "Height": height }).to_string();
        lock(&writer)
            .send(&Frame::Data {
                stream: id,
                flags: 0,
                data: size.into_bytes(),
            })
            .context("sending the terminal size")?;
    }

    let sent = Arc::new(AtomicU64::new(0));
    if let (Some(input), Some(id)) = (input, streams.stdin) {
        let (writer, sent, events) = (writer.clone(), sent.clone(), events.clone());
        thread::spawn(move || {
            let end = pump(input, id, &writer, &sent);
            let _ = events.send(Event::Input(end));
        });
    }
    drop(events);

    let mut stdin_closed = false;
    let mut stdin_error = None;
    loop {
        match next_event(&rx, deadline, "the exec")? {
            Event::Finished(result) => {
                let received = result?;
                return Ok(Session {
                    protocol,
                    error: received.error,
                    stdin_bytes: sent.load(Ordering::SeqCst),
                    stdin_closed,
                    stdin_error,
                    stdout_bytes: received.stdout_bytes,
                    stderr_bytes: received.stderr_bytes,
                });
            }
            Event::Input(InputEnd::Closed) => stdin_closed = true,
            Event::Input(InputEnd::ReadFailed(e)) => {
                return Err(anyhow!(e).context("reading the input for stdin"))
            }
            // What became of the process is for the error stream to say.
            Event::Input(InputEnd::WriteFailed(e)) => stdin_error = Some(e.to_string()),
            Event::Ping(id) => {
                // The connection may be closing: the status still counts.
                let _ = pong(&writer, id);
            }
            Event::Replied(_) | Event::Reset(..) => {}
        }
    }
}

/// Echoes a server's PING. containerd's server sends none (its upgrader
/// has no ping period), but SPDY requires the echo.
fn pong(writer: &Mutex<Writer>, id: u32) -> Result<()> {
    lock(writer)
        .send(&Frame::Ping { id })
        .context("answering a PING")
}

fn next_event(rx: &Receiver<Event>, deadline: Instant, what: &str) -> Result<Event> {
    match rx.recv_timeout(time_left(deadline, what)?) {
        Ok(event) => Ok(event),
        Err(RecvTimeoutError::Timeout) => bail!("{what} did not finish in time (--timeout)"),
        Err(RecvTimeoutError::Disconnected) => bail!("the connection's reader is gone"),
    }
}

fn time_left(deadline: Instant, what: &str) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("{what} did not finish in time (--timeout)");
    }
    Ok(left)
}

/// Copies `input` to the stdin stream, then half-closes it.
fn pump(
    mut input: Box<dyn Read + Send>,
    stream: u32,
    writer: &Mutex<Writer>,
    sent: &AtomicU64,
) -> InputEnd {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return InputEnd::ReadFailed(e),
        };
        let frame = Frame::Data {
            stream,
            flags: 0,
            data: buf[..n].to_vec(),
        };
        if let Err(e) = lock(writer).send(&frame) {
            return InputEnd::WriteFailed(e);
        }
        sent.fetch_add(n as u64, Ordering::SeqCst);
    }
    let fin = Frame::Data {
        stream,
        flags: FLAG_FIN,
        data: Vec::new(),
    };
    match lock(writer).send(&fin) {
        Ok(()) => InputEnd::Closed,
        Err(e) => InputEnd::WriteFailed(e),
    }
}

/// Reads frames until the server closes the connection or every stream it
/// writes on has ended (FIN or RST_STREAM): stdout and stderr to ours,
/// byte for byte, the error stream into memory.
fn read_frames(
    mut conn: BufReader<TcpStream>,
    streams: &Streams,
    events: &Sender<Event>,
) -> Result<Received> {
    let mut received = Received::default();
    let mut open: Vec<u32> = [Some(streams.error), Some(streams.stdout), streams.stderr]
        .into_iter()
        .flatten()
        .collect();
    while let Some(frame) = Frame::read(&mut conn).context("reading from the streaming server")? {
        match frame {
            Frame::Data {
                stream,
                flags,
                data,
            } => {
                if stream == streams.stdout {
                    let mut out = io::stdout().lock();
                    out.write_all(&data)
                        .and_then(|()| out.flush())
                        .context("writing stdout")?;
                    received.stdout_bytes += data.len() as u64;
                } else if Some(stream) == streams.stderr {
                    io::stderr()
                        .lock()
                        .write_all(&data)
                        .context("writing stderr")?;
                    received.stderr_bytes += data.len() as u64;
                } else if stream == streams.error {
                    let room = ERROR_LIMIT.saturating_sub(received.error.len());
                    received
                        .error
                        .extend_from_slice(&data[..data.len().min(room)]);
                }
                if flags & FLAG_FIN != 0 {
                    open.retain(|&id| id != stream);
                }
            }
            Frame::SynReply { stream, flags, .. } => {
                let _ = events.send(Event::Replied(stream));
                if flags & FLAG_FIN != 0 {
                    open.retain(|&id| id != stream);
                }
            }
            Frame::RstStream { stream, status } => {
                open.retain(|&id| id != stream);
                let _ = events.send(Event::Reset(stream, status));
            }
            // The server's pings have even ids; odd ones would answer ours,
            // and we send none.
            Frame::Ping { id } if id % 2 == 0 => {
                let _ = events.send(Event::Ping(id));
            }
            // GOAWAY: the server is closing; what it sent before still
            // arrives, then the connection ends. SETTINGS, WINDOW_UPDATE,
            // HEADERS, streams the server would open, unknown frames:
            // nothing a remotecommand client needs.
            _ => {}
        }
        if open.is_empty() {
            break;
        }
    }
    Ok(received)
}

/// `http://HOST:PORT/PATH` as (`HOST:PORT`, `/PATH`).
fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url.strip_prefix("http://").with_context(|| {
        format!("the streaming URL {url:?} is not http:// (TLS streaming is not supported)")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("the streaming URL {url:?} has no host");
    }
    // A port unless the host ends the authority (`h`, `[::1]`).
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let authority = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

fn upgrade_request(authority: &str, path: &str) -> String {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\n\
         Host: {authority}\r\n\
         User-Agent: microvm-tests-cri\r\n\
         Content-Length: 0\r\n\
         Connection: Upgrade\r\n\
         Upgrade: SPDY/3.1\r\n"
    );
    for protocol in PROTOCOLS {
        request.push_str(&format!("X-Stream-Protocol-Version: {protocol}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// Reads the answer to the upgrade request up to its blank line, leaving
/// what follows (SPDY frames) in `conn`: the protocol the server chose.
fn read_upgrade_response(conn: &mut impl BufRead) -> Result<String> {
    let mut lines = Vec::new();
    let mut size = 0;
    loop {
        let mut line = Vec::new();
        let n = conn
            .read_until(b'\n', &mut line)
            .context("reading the answer to the upgrade request")?;
        if n == 0 {
            bail!("the streaming server closed the connection without answering the upgrade");
        }
        size += n;
        if size > HEAD_LIMIT {
            bail!("the streaming server's answer has no end of its head");
        }
        let line = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let status = lines.first().cloned().unwrap_or_default();
    let header = |name: &str| {
        lines[1..].iter().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    if status.split_whitespace().nth(1) != Some("101") {
        let length = header("content-length")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
            .min(HEAD_LIMIT);
        let mut body = vec![0u8; length];
        let body = match conn.read_exact(&mut body) {
            Ok(()) => String::from_utf8_lossy(&body).trim().to_string(),
            Err(_) => String::new(),
        };
        bail!("the streaming server refused the upgrade: {status}: {body}");
    }
    let upgrade = header("upgrade").unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("SPDY/3.1") {
        bail!("the streaming server upgraded to {upgrade:?}, not SPDY/3.1");
    }
    match header("x-stream-protocol-version") {
        Some(p) if PROTOCOLS.contains(&p.as_str()) => Ok(p),
        Some(p) => bail!("the streaming server chose the protocol {p:?}, which was not offered"),
        None => bail!("the streaming server chose no stream protocol (v1 is not supported)"),
    }
}

/// What the error stream says of the process.
#[derive(Debug, PartialEq)]
enum Status {
    Exited(i32),
    /// The exec failed without an exit code: the server's message.
    Failed(String),
}

/// Reads the error stream: v4 carries a JSON `metav1.Status` (Success, or
/// Failure with reason NonZeroExitCode and the code as the message of the
/// cause ExitCode, or another failure); v2 and v3 carry nothing on success
/// and an error message otherwise (the code, if any, at its end).
fn exit_status(protocol: &str, error: &[u8]) -> Result<Status> {
    let text = String::from_utf8_lossy(error);
    if protocol != V4 {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Status::Exited(0));
        }
        let code = text
            .rsplit_once("exit code ")
            .and_then(|(_, n)| n.trim().parse().ok());
        return Ok(code.map_or_else(|| Status::Failed(text.to_string()), Status::Exited));
    }
    if error.is_empty() {
        bail!("the streaming server ended without an exit status");
    }
    let status: Value = serde_json::from_slice(error)
        .with_context(|| format!("the exit status is not JSON: {text:?}"))?;
    if status["status"] == "Success" {
        return Ok(Status::Exited(0));
    }
    if status["reason"] == "NonZeroExitCode" {
        let code = status["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|cause| cause["reason"] == "ExitCode")
            .find_map(|cause| cause["message"].as_str()?.trim().parse().ok());
        if let Some(code) = code {
            return Ok(Status::Exited(code));
        }
    }
    let message = status["message"].as_str().unwrap_or(&text).to_string();
    Ok(Status::Failed(message))
}

/// Our terminal's size (columns, rows), if stdout, stdin or stderr is one.
fn terminal_size() -> Option<(u16, u16)> {
    [1, 0, 2].into_iter().find_map(|fd| {
        // SAFETY: TIOCGWINSZ fills the winsize it is given, nothing more.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `size` lives across the call.
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0;
        (ok && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        let mut args = Args::parse(&words).unwrap();
        assert_eq!(args.positional("command").unwrap(), "exec");
        args
    }

    #[test]
    fn parses_the_command_line() {
        let options = Options::parse(args("exec --stdin in.bin c1 -- sh -c x")).unwrap();
        assert_eq!(
            options,
            Options {
                id: "c1".into(),
                cmd: vec!["sh".into(), "-c".into(), "x".into()],
                tty: false,
                stdin: Some("in.bin".into()),
                verbose: false,
            }
        );
        let request = options.request();
        assert!(request.stdin && request.stdout && request.stderr && !request.tty);

        let options = Options::parse(args("exec c1 --tty --verbose --stdin=- -- sh")).unwrap();
        assert_eq!(options.stdin.as_deref(), Some("-"));
        let request = options.request();
        assert!(request.tty && request.stdin && request.stdout && !request.stderr);

        let request = Options::parse(args("exec c1 -- true")).unwrap().request();
        assert!(!request.stdin);

        assert!(Options::parse(args("exec c1")).is_err());
        assert!(Options::parse(args("exec -- true")).is_err());
        assert!(Options::parse(args("exec c1 extra -- true")).is_err());
        assert!(Options::parse(args("exec --stdin= c1 -- true")).is_err());
    }

    #[test]
    fn stream_ids_are_odd_and_in_order() {
        let all = Streams::new(V4, true, false);
        assert_eq!(
            all.all(),
            [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")]
        );
        let tty = Streams::new(V4, false, true);
        assert_eq!(tty.all(), [(1, "error"), (3, "stdout"), (5, "resize")]);
        assert_eq!(tty.name(5), "resize");
        let v2 = Streams::new(V2, true, true);
        assert_eq!(v2.all(), [(1, "error"), (3, "stdin"), (5, "stdout")]);
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:40123/exec/AbC").unwrap(),
            ("127.0.0.1:40123".into(), "/exec/AbC".into())
        );
        assert_eq!(
            split_url("http://[::1]/exec/x").unwrap(),
            ("[::1]:80".into(), "/exec/x".into())
        );
        assert_eq!(
            split_url("http://[::1]:9/").unwrap(),
            ("[::1]:9".into(), "/".into())
        );
        assert!(split_url("https://127.0.0.1:1/exec/x").is_err());
    }

    #[test]
    fn the_upgrade_request_offers_spdy_and_the_protocols() {
        let request = upgrade_request("127.0.0.1:1", "/exec/t");
        assert!(request.starts_with("POST /exec/t HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"));
        assert!(request.contains("\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"));
        assert!(request.contains("X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"));
        assert!(request.ends_with("v2.channel.k8s.io\r\n\r\n"));
    }

    #[test]
    fn reads_the_upgrade_answer_and_leaves_the_frames() {
        let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
            Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\
            Date: today\r\n\r\n"
            .to_vec();
        answer.extend(Frame::Ping { id: 2 }.encode());
        let mut conn = &answer[..];
        assert_eq!(read_upgrade_response(&mut conn).unwrap(), V4);
        assert_eq!(Frame::read(&mut conn).unwrap(), Some(Frame::Ping { id: 2 }));

        let refused = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 12\r\n\r\nno protocolX";
        let e = read_upgrade_response(&mut &refused[..]).unwrap_err();
        assert!(e.to_string().contains("403 Forbidden: no protocolX"), "{e}");

        let v1 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n\r\n";
        assert!(read_upgrade_response(&mut &v1[..]).is_err());
        assert!(read_upgrade_response(&mut &b"HTTP/1.1 101 OK\r\n"[..]).is_err());
    }

    #[test]
    fn exit_statuses() {
        let v4 = |s: &str| exit_status(V4, s.as_bytes()).unwrap();
        assert_eq!(
            v4(r#"{"metadata":{},"status":"Success"}"#),
            Status::Exited(0)
        );
        assert_eq!(
            v4(
                r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 7], exit code 7","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"7"}]}}"#
            ),
            Status::Exited(7)
        );
        assert_eq!(
            v4(
                r#"{"status":"Failure","message":"exec failed: no such file","reason":"InternalError","code":500}"#
            ),
            Status::Failed("exec failed: no such file".into())
        );
        assert!(exit_status(V4, b"").is_err());
        assert!(exit_status(V4, b"not json").is_err());

        assert_eq!(exit_status(V3, b"").unwrap(), Status::Exited(0));
        assert_eq!(
            exit_status(
                V3,
                b"command terminated with non-zero exit code: error executing command [sh], exit code 3"
            )
            .unwrap(),
            Status::Exited(3)
        );
        assert_eq!(
            exit_status(V2, b"Internal error occurred: boom").unwrap(),
            Status::Failed("Internal error occurred: boom".into())
        );
    }
}

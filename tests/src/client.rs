//! Runs one command in a test host through its supervisor's control socket.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::testhost;
use crate::wire::{ExitStatus, Frame, Kind, SpawnRequest};

/// Where the command's stdin comes from.
pub enum Input {
    /// Closed at once.
    None,
    Bytes(Vec<u8>),
    /// Copied until its end (e.g. the caller's own stdin).
    Reader(Box<dyn Read + Send>),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the test host at {dir} (is it running? `testhost start`)")]
    Connect { dir: String, source: io::Error },
    #[error("the test host could not start {argv:?}: {message}")]
    SpawnFailed { argv: Vec<String>, message: String },
    #[error("the test host went away while {argv:?} ran\n{report}")]
    Lost { argv: Vec<String>, report: String },
    #[error("the test host did not end {argv:?} within {grace:?} of its timeout: the test host is wedged\n{report}")]
    Wedged {
        argv: Vec<String>,
        grace: Duration,
        report: String,
    },
    #[error("talking to the test host")]
    Io(#[from] io::Error),
}

/// How long a timed-out command may take to be killed and reported before
/// the test host counts as wedged (so a stuck test host fails a test run
/// instead of hanging it).
const KILL_GRACE: Duration = Duration::from_secs(60);

/// How a command run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: ExitStatus,
    /// The timeout passed and the command was killed.
    pub timed_out: bool,
}

/// Runs `request` in the test host whose state is in `dir`, handing each
/// piece of output to `on_output` (with `Kind::Stdout` or `Kind::Stderr`) as
/// it arrives. After `timeout` the command's process group is killed.
pub fn run(
    dir: &Path,
    request: &SpawnRequest,
    input: Input,
    timeout: Option<Duration>,
    mut on_output: impl FnMut(Kind, &[u8]),
) -> Result<Outcome, RunError> {
    let mut stream = testhost::connect(dir).map_err(|source| RunError::Connect {
        dir: dir.display().to_string(),
        source,
    })?;
    Frame::json(0, Kind::Spawn, request).write_to(&mut stream)?;
    let lost = || RunError::Lost {
        argv: request.argv.clone(),
        report: testhost::failure_report(dir, Duration::from_secs(15)),
    };
    // Detached: a reader such as a terminal may never end; the thread goes
    // when its next write finds the stream closed.
    let mut stdin_stream = stream.try_clone()?;
    thread::spawn(move || send_input(&mut stdin_stream, input));
    {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut timed_out = false;
        loop {
            if timed_out {
                // Waiting for the killed command's Exit frame, within KILL_GRACE.
            } else if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    timed_out = true;
                    let kill = Frame::new(0, Kind::Signal, libc::SIGKILL.to_le_bytes().to_vec());
                    kill.write_to(&mut stream)?;
                    stream.set_read_timeout(Some(KILL_GRACE))?;
                } else {
                    stream.set_read_timeout(Some(left))?;
                }
            }
            let frame = match Frame::read_from(&mut stream) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Err(lost()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if timed_out {
                        return Err(RunError::Wedged {
                            argv: request.argv.clone(),
                            grace: KILL_GRACE,
                            report: testhost::failure_report(dir, Duration::ZERO),
                        });
                    }
                    continue;
                }
                Err(_) => return Err(lost()),
            };
            match frame.kind {
                Kind::Stdout | Kind::Stderr => on_output(frame.kind, &frame.payload),
                Kind::Exit => {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return Ok(Outcome {
                        status: frame.parse_json()?,
                        timed_out,
                    });
                }
                Kind::SpawnFailed => {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return Err(RunError::SpawnFailed {
                        argv: request.argv.clone(),
                        message: String::from_utf8_lossy(&frame.payload).into_owned(),
                    });
                }
                other => tracing::debug!("ignoring {other:?} frame"),
            }
        }
    }
}

fn send_input(stream: &mut UnixStream, input: Input) {
    let mut send = |chunk: &[u8]| Frame::new(0, Kind::Stdin, chunk).write_to(stream);
    let _ = match input {
        Input::None => Ok(()),
        Input::Bytes(bytes) => bytes.chunks(64 * 1024).try_for_each(&mut send),
        Input::Reader(mut reader) => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        if send(&buf[..n]).is_err() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break Ok(()),
                }
            }
        }
    };
    // End of input.
    let _ = send(&[]);
    let _ = stream.flush();
}

//! The host end of Firecracker-style "hybrid vsock": the VMM exposes the
//! guest's vsock as a Unix socket; a host process connects, writes
//! `CONNECT <port>\n` and reads `OK <host port>\n`, then talks to the guest
//! listener on `<port>` over that stream.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {path}")]
    Socket { path: String, source: io::Error },
    #[error("the guest refused or closed vsock port {port}")]
    Refused { port: u32 },
    #[error("unexpected hybrid vsock answer {0:?}")]
    BadAnswer(String),
}

/// One attempt to reach guest vsock `port` through the VMM's socket at `uds`.
/// Fails with [`ConnectError::Refused`] while nothing listens on the port yet.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ConnectError> {
    let socket_err = |source| ConnectError::Socket {
        path: uds.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(uds).map_err(socket_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(socket_err)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(socket_err)?;
    // Read the answer byte by byte: nothing past its newline may be consumed.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ConnectError::Refused { port }),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if answer.len() < 64 => answer.push(byte[0]),
            Ok(_) => {
                return Err(ConnectError::BadAnswer(
                    String::from_utf8_lossy(&answer).into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ConnectError::Refused { port })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ConnectError::Refused { port })
            }
            Err(e) => return Err(socket_err(e)),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if !answer.starts_with("OK ") {
        return Err(ConnectError::BadAnswer(answer));
    }
    stream.set_read_timeout(None).map_err(socket_err)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(answer: &'static [u8]) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir =
            std::env::temp_dir().join(format!("hybrid-{}-{}", std::process::id(), answer.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = vec![0u8; 13];
            stream.read_exact(&mut request).unwrap();
            stream.write_all(answer).unwrap();
            request
        });
        (path, handle)
    }

    #[test]
    fn handshake_then_payload_is_untouched() {
        let (path, server) = serve_once(b"OK 1073741824\nhello");
        let mut stream = connect(&path, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(server.join().unwrap(), b"CONNECT 1024\n");
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[test]
    fn closed_or_garbled_answers_are_errors() {
        let (path, server) = serve_once(b"");
        assert!(matches!(
            connect(&path, 1024, Duration::from_secs(5)),
            Err(ConnectError::Refused { port: 1024 })
        ));
        server.join().unwrap();
        let (path, server) = serve_once(b"NOPE\n");
        assert!(matches!(
            connect(&path, 1024, Duration::from_secs(5)),
            Err(ConnectError::BadAnswer(_))
        ));
        server.join().unwrap();
        let missing = connect(
            Path::new("/nonexistent/v.sock"),
            1024,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/v.sock"));
    }
}

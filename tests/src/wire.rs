//! The framing spoken on the test host's command channel.
//!
//! One virtio-serial port carries every command running in the test host, so
//! each frame names the channel (one per command) it belongs to. Clients speak
//! the same frames to the host-side supervisor over a Unix socket, always on
//! channel 0; the supervisor maps them onto guest channels.
//!
//! A frame is `channel: u32 LE | kind: u8 | length: u32 LE | payload`.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Frames larger than this are refused, so a corrupt stream cannot make a
/// reader allocate gigabytes.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// host → guest: start a command; payload is a JSON [`SpawnRequest`].
    Spawn = 1,
    /// host → guest: bytes for the command's stdin; empty means end of input.
    Stdin = 2,
    /// host → guest: send a signal (payload: i32 LE) to the command's process group.
    Signal = 3,
    /// host → guest: power the test host off.
    Shutdown = 4,
    /// host → guest: nothing to do. Sent every [`HEARTBEAT_INTERVAL`]: QEMU's
    /// TCG, running nested SVM guests, now and then leaves the test host
    /// idle with its timer interrupt lost (its console then reports soft
    /// lockups of minutes); any interrupt wakes it, and this one bounds
    /// such a stall to the interval.
    Heartbeat = 5,
    /// guest → host: the test host is up; payload is its `uname -r`.
    Ready = 10,
    /// guest → host: bytes the command wrote to stdout.
    Stdout = 11,
    /// guest → host: bytes the command wrote to stderr.
    Stderr = 12,
    /// guest → host: the command ended; payload is a JSON [`ExitStatus`].
    Exit = 13,
    /// guest → host: the command could not be started; payload is the reason.
    SpawnFailed = 14,
}

/// How often the supervisor sends a [`Kind::Heartbeat`].
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

impl TryFrom<u8> for Kind {
    type Error = io::Error;

    fn try_from(value: u8) -> io::Result<Self> {
        Ok(match value {
            1 => Kind::Spawn,
            2 => Kind::Stdin,
            3 => Kind::Signal,
            4 => Kind::Shutdown,
            5 => Kind::Heartbeat,
            10 => Kind::Ready,
            11 => Kind::Stdout,
            12 => Kind::Stderr,
            13 => Kind::Exit,
            14 => Kind::SpawnFailed,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown frame kind {other}"),
                ))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: u32,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(channel: u32, kind: Kind, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            channel,
            kind,
            payload: payload.into(),
        }
    }

    pub fn json(channel: u32, kind: Kind, value: &impl Serialize) -> Self {
        Self::new(
            channel,
            kind,
            serde_json::to_vec(value).expect("plain structs serialize"),
        )
    }

    pub fn parse_json<T: for<'de> Deserialize<'de>>(&self) -> io::Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad {:?} payload: {e}", self.kind),
            )
        })
    }

    pub fn signal(&self) -> io::Result<i32> {
        let bytes: [u8; 4] = self.payload.as_slice().try_into().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, "signal frame needs 4 bytes")
        })?;
        Ok(i32::from_le_bytes(bytes))
    }

    /// Writes the frame in one `write_all` so frames from several threads
    /// sharing a locked writer never interleave.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let len = u32::try_from(self.payload.len())
            .ok()
            .filter(|len| *len <= MAX_PAYLOAD)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        let mut buf = Vec::with_capacity(9 + self.payload.len());
        buf.extend_from_slice(&self.channel.to_le_bytes());
        buf.push(self.kind as u8);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&self.payload);
        out.write_all(&buf)?;
        out.flush()
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream.
    pub fn read_from(input: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut header = [0u8; 9];
        let mut filled = 0;
        while filled < header.len() {
            match input.read(&mut header[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let channel = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let kind = Kind::try_from(header[4])?;
        let len = u32::from_le_bytes(header[5..9].try_into().unwrap());
        if len > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds the {MAX_PAYLOAD} byte limit"),
            ));
        }
        let mut payload = vec![0u8; len as usize];
        input.read_exact(&mut payload)?;
        Ok(Some(Frame {
            channel,
            kind,
            payload,
        }))
    }
}

/// A command to run in the test host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpawnRequest {
    pub argv: Vec<String>,
    /// The whole environment of the command (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub cwd: Option<String>,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        }
    }
}

impl From<std::process::ExitStatus> for ExitStatus {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(signal)) => ExitStatus::Signal(signal),
            (None, None) => ExitStatus::Code(-1),
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_back_to_back() {
        let frames = [
            Frame::new(7, Kind::Stdout, b"hello".to_vec()),
            Frame::new(0, Kind::Stdin, Vec::new()),
            Frame::json(3, Kind::Exit, &ExitStatus::Signal(9)),
            Frame::new(1, Kind::Signal, 15i32.to_le_bytes().to_vec()),
        ];
        let mut stream = Vec::new();
        for frame in &frames {
            frame.write_to(&mut stream).unwrap();
        }
        let mut reader = stream.as_slice();
        for frame in &frames {
            assert_eq!(Frame::read_from(&mut reader).unwrap().as_ref(), Some(frame));
        }
        assert_eq!(Frame::read_from(&mut reader).unwrap(), None);
        assert_eq!(
            frames[2].parse_json::<ExitStatus>().unwrap(),
            ExitStatus::Signal(9)
        );
        assert_eq!(frames[3].signal().unwrap(), 15);
    }

    #[test]
    fn rejects_corrupt_streams() {
        let mut stream = Vec::new();
        Frame::new(1, Kind::Stdout, b"abc".to_vec())
            .write_to(&mut stream)
            .unwrap();
        // Truncated payload.
        assert!(Frame::read_from(&mut &stream[..stream.len() - 1]).is_err());
        // Truncated header.
        assert!(Frame::read_from(&mut &stream[..4]).is_err());
        // Unknown kind.
        let mut bad_kind = stream.clone();
        bad_kind[4] = 99;
        assert!(Frame::read_from(&mut bad_kind.as_slice()).is_err());
        // Absurd length.
        let mut huge = stream.clone();
        huge[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Frame::read_from(&mut huge.as_slice()).is_err());
    }

    #[test]
    fn shell_codes_follow_the_shell_convention() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signal(0).success());
    }
}

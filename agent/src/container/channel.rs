//! The channel between the agent and a container's setup processes: a
//! SOCK_SEQPACKET socket pair carrying one JSON message per packet, with a
//! file descriptor attached where needed (the console's pty master).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::ContainerError;

/// Largest packet: an OCI spec with a full seccomp profile fits easily.
const MAX_PACKET: usize = 1 << 20;

/// The fd number the setup process finds its end of the channel at.
pub const CHILD_FD: RawFd = 3;

/// What the agent tells a setup process.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToChild {
    /// Everything needed to build the container process.
    Setup(Box<super::child::SetupConfig>),
    /// The user namespace's id maps are written.
    IdsMapped,
    /// Run the process (exec it).
    Start,
}

/// What a setup process tells the agent.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromChild {
    /// A new user namespace waits for its uid/gid maps (pid in the agent's view).
    MapIds { pid: i32 },
    /// The container process exists; its pid in the agent's view.
    Pid { pid: i32 },
    /// The console's pty master travels with this message.
    Console,
    /// Set up and waiting for `Start`.
    Ready,
    /// Setup or exec failed; the process exits.
    Failed(Failure),
}

/// Why a setup process failed, typed where the agent tells kinds apart
/// (the runtime reports a missing program differently).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    ExecNotFound { program: String },
    ExecDenied { program: String },
    Setup { message: String },
}

impl From<ContainerError> for Failure {
    fn from(error: ContainerError) -> Failure {
        match error {
            ContainerError::ExecNotFound(program) => Failure::ExecNotFound { program },
            ContainerError::ExecDenied(program) => Failure::ExecDenied { program },
            ContainerError::Setup(message) => Failure::Setup { message },
            other => Failure::Setup {
                message: protocols::error_chain(&other),
            },
        }
    }
}

impl From<Failure> for ContainerError {
    fn from(failure: Failure) -> ContainerError {
        match failure {
            Failure::ExecNotFound { program } => ContainerError::ExecNotFound(program),
            Failure::ExecDenied { program } => ContainerError::ExecDenied(program),
            Failure::Setup { message } => ContainerError::Setup(message),
        }
    }
}

/// One end of the channel.
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair, both ends close-on-exec: (agent's end, child's end).
    pub fn pair() -> Result<(Channel, Channel), ContainerError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| ContainerError::Setup(format!("creating the setup channel: {e}")))?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// The child's end, found at [`CHILD_FD`] in a setup process.
    ///
    /// # Safety
    /// Only in a setup process, where fd 3 is the channel and nothing else owns it.
    pub unsafe fn inherited() -> Channel {
        // SAFETY: the caller guarantees fd 3 is our channel, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(CHILD_FD) };
        // The container process must not inherit it: its closing on exec is
        // how the agent learns the exec happened.
        let _ = nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Channel { fd }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), ContainerError> {
        self.send_with_fd(message, None)
    }

    pub fn send_with_fd<T: Serialize>(
        &self,
        message: &T,
        fd: Option<RawFd>,
    ) -> Result<(), ContainerError> {
        let bytes = serde_json::to_vec(message)
            .map_err(|e| ContainerError::Setup(format!("encoding a setup message: {e}")))?;
        if bytes.len() > MAX_PACKET {
            return Err(ContainerError::InvalidSpec(format!(
                "the spec is {} bytes; at most {MAX_PACKET} are supported",
                bytes.len()
            )));
        }
        let iov = [IoSlice::new(&bytes)];
        let fds;
        let cmsgs: Vec<ControlMessage> = match fd {
            Some(fd) => {
                fds = [fd];
                vec![ControlMessage::ScmRights(&fds)]
            }
            None => Vec::new(),
        };
        sendmsg::<()>(self.fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)
            .map_err(|e| ContainerError::Setup(format!("sending a setup message: {e}")))?;
        Ok(())
    }

    /// The next message, or None when the other side closed (for the agent:
    /// the container process exec'd, closing its close-on-exec end).
    pub fn receive<T: DeserializeOwned>(&self) -> Result<Option<T>, ContainerError> {
        Ok(self.receive_with_fd()?.map(|(message, _)| message))
    }

    pub fn receive_with_fd<T: DeserializeOwned>(
        &self,
    ) -> Result<Option<(T, Option<OwnedFd>)>, ContainerError> {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
        let (len, fd) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fd = None;
                    for cmsg in msg.cmsgs().map_err(|e| {
                        ContainerError::Setup(format!("reading a setup message: {e}"))
                    })? {
                        if let ControlMessageOwned::ScmRights(fds) = cmsg {
                            for raw in fds {
                                // SAFETY: the kernel just installed this fd for us.
                                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                                fd.get_or_insert(owned);
                            }
                        }
                    }
                    break (msg.bytes, fd);
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    return Err(ContainerError::Setup(format!(
                        "reading a setup message: {e}"
                    )))
                }
            }
        };
        if len == 0 {
            return Ok(None);
        }
        let message = serde_json::from_slice(&buf[..len])
            .map_err(|e| ContainerError::Setup(format!("decoding a setup message: {e}")))?;
        Ok(Some((message, fd)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure crosses the channel with its kind: no message is parsed
    /// back into a kind.
    #[test]
    fn failures_keep_their_kind_across_the_channel() {
        let (agent, child) = Channel::pair().expect("a socket pair");
        for error in [
            ContainerError::ExecNotFound("no-such-program".into()),
            ContainerError::ExecDenied("/etc/passwd".into()),
            ContainerError::Setup("mounting /proc: EPERM".into()),
            ContainerError::Cgroup("joining: EBUSY".into()),
        ] {
            let expected = Failure::from(error);
            child
                .send(&FromChild::Failed(expected.clone()))
                .expect("sending");
            let Some(FromChild::Failed(got)) = agent.receive::<FromChild>().expect("receiving")
            else {
                panic!("no failure came");
            };
            assert_eq!(got, expected);
            match (ContainerError::from(got), expected) {
                (ContainerError::ExecNotFound(p), Failure::ExecNotFound { program }) => {
                    assert_eq!(p, program)
                }
                (ContainerError::ExecDenied(p), Failure::ExecDenied { program }) => {
                    assert_eq!(p, program)
                }
                (ContainerError::Setup(m), Failure::Setup { message }) => {
                    assert_eq!(m, message)
                }
                (error, failure) => panic!("{failure:?} came back as {error:?}"),
            }
        }
    }
}

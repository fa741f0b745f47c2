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
    Failed { message: String },
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

//! The host backend of the vsock device, in Firecracker's "hybrid vsock"
//! style: guest vsock streams are carried over host Unix sockets.
//!
//! - Host to guest: a host process connects to the device's Unix socket and
//!   writes `CONNECT <port>\n`; once the guest accepts on that vsock port, it
//!   reads `OK <host port>\n` and the socket carries the stream.
//! - Guest to host: a guest connection to host port P is bridged to the Unix
//!   socket `<path>_P`, which a host process listens on.
//!
//! All sockets are non-blocking and registered edge-triggered with the
//! device's event loop; data moves only when the peer has credit for it.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events};

use super::connection::{Connection, State};
use super::packet::*;
use super::VsockError;

/// Event data tags the device uses to tell its registered fds apart.
pub const EVENT_LISTENER: u32 = 0x100;
pub const EVENT_HOST_STREAM: u32 = 0x101;

/// First host port handed to host-initiated connections, above the ports
/// guest programs normally use.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// `CONNECT 4294967295\n` and some slack.
const MAX_CONNECT_LINE: usize = 32;
/// The most header-only packets (RST, RESPONSE, REQUEST, credit updates)
/// waiting for guest rx buffers, as in Firecracker. A guest that sends
/// faster than it takes its replies loses the replies beyond this, not
/// host memory.
pub const MAX_PENDING_CONTROL: usize = 256;
/// The most connections (and host connections still sending their
/// `CONNECT` line) at once, as in Firecracker: a guest connection beyond
/// it gets a RST, a host one is closed at once.
pub const MAX_CONNECTIONS: usize = 1023;

/// A host socket that has not finished its `CONNECT <port>\n` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A header-only packet waiting for a guest rx buffer.
#[derive(Debug, Clone, Copy)]
struct ControlPacket {
    key: ConnectionKey,
    op: u16,
    flags: u32,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// See [`Muxer::set_host_ports_path`].
    host_ports_path: Option<PathBuf>,
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    connections: HashMap<ConnectionKey, Connection>,
    by_fd: HashMap<RawFd, ConnectionKey>,
    control: VecDeque<ControlPacket>,
    next_local_port: u32,
    /// The connection last served host data, so the next packet goes to
    /// the one after it: one busy connection cannot starve the others.
    last_served: Option<ConnectionKey>,
    /// Control packets dropped because [`MAX_PENDING_CONTROL`] were waiting.
    dropped_control: u64,
    /// Connections refused because [`MAX_CONNECTIONS`] were open.
    refused_connections: u64,
}

fn stream_events(stream: &UnixStream, data: u32) -> Events {
    Events::with_data(
        stream,
        data,
        EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
    )
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let bind_error = |source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            host_ports_path: None,
            listener,
            handshakes: HashMap::new(),
            connections: HashMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            last_served: None,
            dropped_control: 0,
            refused_connections: 0,
        })
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Guest connections to host port P go to `<path>_P` (default: the
    /// listening socket's own path).
    pub fn set_host_ports_path(&mut self, path: PathBuf) {
        self.host_ports_path = Some(path);
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len() + self.handshakes.len()
    }

    /// Control packets waiting for guest rx buffers (at most
    /// [`MAX_PENDING_CONTROL`]).
    pub fn pending_control(&self) -> usize {
        self.control.len()
    }

    /// Control packets dropped at the [`MAX_PENDING_CONTROL`] cap.
    pub fn dropped_control(&self) -> u64 {
        self.dropped_control
    }

    /// Connections refused at the [`MAX_CONNECTIONS`] cap.
    pub fn refused_connections(&self) -> u64 {
        self.refused_connections
    }

    fn at_connection_cap(&mut self) -> bool {
        if self.connection_count() < MAX_CONNECTIONS {
            return false;
        }
        self.refused_connections += 1;
        crate::guest_warn!(
            refused = self.refused_connections,
            "vsock: {MAX_CONNECTIONS} connections open: refusing another"
        );
        true
    }

    /// Accepts every pending host connection.
    pub fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::guest_warn!("vsock: accepting on {}: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.at_connection_cap() {
                // Dropping the stream closes it: the host side sees EOF.
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                crate::guest_warn!("vsock: {e}");
                continue;
            }
            if let Err(e) = ops.add(stream_events(&stream, EVENT_HOST_STREAM)) {
                crate::guest_warn!("vsock: watching a host connection: {e:?}");
                continue;
            }
            let fd = stream.as_raw_fd();
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
            self.read_connect_line(fd, ops);
        }
    }

    /// Something happened on a host socket.
    pub fn host_event(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        if self.handshakes.contains_key(&fd) {
            self.read_connect_line(fd, ops);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            conn.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush(key, ops);
        }
    }

    fn read_connect_line(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        // Byte by byte, so nothing after the line is consumed.
        let mut byte = [0u8; 1];
        let outcome = loop {
            match handshake.stream.read(&mut byte) {
                Ok(0) => break Err("the host closed the connection before CONNECT".to_string()),
                Ok(_) if byte[0] == b'\n' => {
                    break Ok(String::from_utf8_lossy(&handshake.line).into_owned())
                }
                Ok(_) if handshake.line.len() >= MAX_CONNECT_LINE => {
                    break Err("CONNECT line too long".into())
                }
                Ok(_) => handshake.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        let port = outcome.and_then(|line| {
            line.trim_end_matches('\r')
                .strip_prefix("CONNECT ")
                .and_then(|port| port.trim().parse::<u32>().ok())
                .ok_or(format!("expected `CONNECT <port>`, got {line:?}"))
        });
        let peer_port = match port {
            Ok(port) => port,
            Err(reason) => {
                crate::guest_warn!("vsock: host connection dropped: {reason}");
                let _ = ops.remove(Events::empty(&handshake.stream));
                return;
            }
        };
        let local_port = self.allocate_local_port();
        let key = ConnectionKey {
            local_port,
            peer_port,
        };
        if self.control_full() {
            let _ = ops.remove(Events::empty(&handshake.stream));
            return;
        }
        self.by_fd.insert(fd, key);
        self.connections.insert(
            key,
            Connection::new(key, handshake.stream, State::AwaitingResponse),
        );
        self.queue_control(key, OP_REQUEST, 0);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.connections.keys().any(|key| key.local_port == port) {
                return port;
            }
        }
    }

    /// Whether [`MAX_PENDING_CONTROL`] packets wait for the guest; if so,
    /// the one that would have joined them is counted as dropped.
    fn control_full(&mut self) -> bool {
        if self.control.len() < MAX_PENDING_CONTROL {
            return false;
        }
        self.dropped_control += 1;
        crate::guest_warn!(
            dropped = self.dropped_control,
            "vsock: {MAX_PENDING_CONTROL} control packets wait for the guest: dropped one"
        );
        true
    }

    /// Queues a header-only packet for the guest, unless
    /// [`MAX_PENDING_CONTROL`] already wait (then it is dropped, counted).
    fn queue_control(&mut self, key: ConnectionKey, op: u16, flags: u32) {
        if !self.control_full() {
            self.control.push_back(ControlPacket { key, op, flags });
        }
    }

    /// Closes a connection: the host socket is dropped (its peer sees EOF)
    /// and the guest gets a RST.
    fn reset(&mut self, key: ConnectionKey, ops: &mut EventOps) {
        if let Some(conn) = self.connections.remove(&key) {
            let _ = ops.remove(Events::empty(&conn.stream));
            self.by_fd.remove(&conn.stream.as_raw_fd());
        }
        self.queue_control(key, OP_RST, 0);
    }

    /// Drops a connection the guest already reset.
    fn forget(&mut self, key: ConnectionKey, ops: &mut EventOps) {
        if let Some(conn) = self.connections.remove(&key) {
            let _ = ops.remove(Events::empty(&conn.stream));
            self.by_fd.remove(&conn.stream.as_raw_fd());
        }
    }

    fn flush(&mut self, key: ConnectionKey, ops: &mut EventOps) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if let Err(e) = conn.flush_to_host() {
            crate::guest_debug!("vsock: host end of {key:?} is gone: {e}");
            self.reset(key, ops);
            return;
        }
        if conn.state == State::Closing && !conn.has_data_for_host() {
            self.reset(key, ops);
        }
    }

    /// A packet the guest put on its tx queue.
    pub fn from_guest(&mut self, header: &PacketHeader, payload: &[u8], ops: &mut EventOps) {
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            crate::guest_warn!(
                "vsock: dropped a packet from cid {} to cid {}",
                { header.src_cid },
                { header.dst_cid }
            );
            return;
        }
        let key = header.key_from_guest();
        if header.type_ != TYPE_STREAM {
            if header.op != OP_RST {
                self.queue_control(key, OP_RST, 0);
            }
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            match header.op {
                OP_REQUEST => self.connect_to_host(key, header, ops),
                OP_RST => {}
                _ => self.queue_control(key, OP_RST, 0),
            }
            return;
        };
        conn.update_peer_credit(header);
        match (header.op, conn.state) {
            (OP_RESPONSE, State::AwaitingResponse) => {
                conn.state = State::Established;
                conn.reply_to_host(format!("OK {}\n", key.local_port).as_bytes());
                self.flush(key, ops);
            }
            (OP_RW, State::Established) => {
                if conn.push_to_host(payload) {
                    self.flush(key, ops);
                } else {
                    crate::guest_warn!("vsock: guest overran the credit of {key:?}");
                    self.reset(key, ops);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.queue_control(key, OP_CREDIT_UPDATE, 0),
            (OP_SHUTDOWN, State::Established | State::Closing) => {
                if header.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending();
                }
                if header.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    conn.state = State::Closing;
                }
                self.flush(key, ops);
            }
            (OP_RST, _) => self.forget(key, ops),
            (op, state) => {
                crate::guest_debug!(
                    "vsock: unexpected {} in state {state:?} on {key:?}",
                    header.op_name()
                );
                let _ = op;
                self.reset(key, ops);
            }
        }
    }

    /// A guest connection to host port P: bridged to the Unix socket `<path>_P`.
    fn connect_to_host(&mut self, key: ConnectionKey, header: &PacketHeader, ops: &mut EventOps) {
        if self.at_connection_cap() {
            self.queue_control(key, OP_RST, 0);
            return;
        }
        if self.control_full() {
            // The guest does not take its replies: it would not get ours.
            return;
        }
        let base = self.host_ports_path.as_ref().unwrap_or(&self.uds_path);
        let path = PathBuf::from(format!("{}_{}", base.display(), key.local_port));
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                crate::guest_debug!(
                    "vsock: guest connection to host port {}: {}: {e}",
                    key.local_port,
                    path.display()
                );
                self.queue_control(key, OP_RST, 0);
                return;
            }
        };
        if let Err(e) = ops.add(stream_events(&stream, EVENT_HOST_STREAM)) {
            crate::guest_warn!("vsock: watching {}: {e:?}", path.display());
            self.queue_control(key, OP_RST, 0);
            return;
        }
        let mut conn = Connection::new(key, stream, State::Established);
        conn.update_peer_credit(header);
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.connections.insert(key, conn);
        // Room was checked above (only this thread queues).
        self.queue_control(key, OP_RESPONSE, 0);
    }

    /// Whether `next_for_guest` may have something.
    pub fn has_work_for_guest(&self) -> bool {
        !self.control.is_empty()
            || self
                .connections
                .values()
                .any(|conn| conn.wants_to_send() || conn.needs_credit_update())
    }

    /// The next packet for the guest: its header, with its payload (at most
    /// `max_payload` bytes) in `payload`. None when there is nothing to send.
    pub fn next_for_guest(
        &mut self,
        payload: &mut Vec<u8>,
        max_payload: usize,
        ops: &mut EventOps,
    ) -> Option<PacketHeader> {
        payload.clear();
        if let Some(packet) = self.control.pop_front() {
            let mut header = match self.connections.get_mut(&packet.key) {
                Some(conn) => conn.header(self.guest_cid, packet.op),
                None => PacketHeader {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: packet.key.local_port,
                    dst_port: packet.key.peer_port,
                    type_: TYPE_STREAM,
                    op: packet.op,
                    ..Default::default()
                },
            };
            header.flags = packet.flags;
            return Some(header);
        }
        if let Some(conn) = self
            .connections
            .values_mut()
            .find(|conn| conn.needs_credit_update())
        {
            return Some(conn.header(self.guest_cid, OP_CREDIT_UPDATE));
        }
        let ready = self.ready_in_turn();
        for key in ready {
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            payload.resize(max_payload, 0);
            match conn.read_host(payload, max_payload) {
                Ok(0) => {
                    payload.clear();
                    let mut header = conn.header(self.guest_cid, OP_SHUTDOWN);
                    header.flags = SHUTDOWN_SEND;
                    return Some(header);
                }
                Ok(n) => {
                    payload.truncate(n);
                    let mut header = conn.header(self.guest_cid, OP_RW);
                    header.len = n as u32;
                    self.last_served = Some(key);
                    return Some(header);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    payload.clear();
                }
                Err(e) => {
                    payload.clear();
                    crate::guest_debug!("vsock: reading the host end of {key:?}: {e}");
                    self.reset(key, ops);
                    return self.next_for_guest(payload, max_payload, ops);
                }
            }
        }
        None
    }
}

/// Connects to a host listener without waiting: a listener whose backlog
/// is full (one that stopped accepting) refuses at once (EAGAIN) instead of
/// blocking the event loop until it accepts.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

impl Muxer {
    /// The connections with host data for the guest, in turn: sorted, the
    /// first one after the connection served last.
    fn ready_in_turn(&self) -> Vec<ConnectionKey> {
        let mut ready: Vec<ConnectionKey> = self
            .connections
            .values()
            .filter(|conn| conn.wants_to_send())
            .map(|conn| conn.key)
            .collect();
        ready.sort_unstable();
        if let Some(last) = self.last_served {
            let next = ready.partition_point(|key| *key <= last);
            ready.rotate_left(next);
        }
        ready
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

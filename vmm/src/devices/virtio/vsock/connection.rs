//! One stream connection between a host Unix socket and a guest vsock
//! socket: its handshake state, the data waiting for the host, and the
//! credit-based flow control of virtio-vsock in both directions.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::packet::{ConnectionKey, PacketHeader, HOST_CID, TYPE_STREAM};

/// What we advertise to the guest as our receive buffer per connection: the
/// most guest data we hold for a host socket that is not reading.
pub const BUFFER_SIZE: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host connected and asked for a guest port; REQUEST sent, no RESPONSE yet.
    AwaitingResponse,
    Established,
    /// The guest closed both directions: flushing what is left, then RST.
    Closing,
}

pub struct Connection {
    pub key: ConnectionKey,
    pub stream: UnixStream,
    pub state: State,
    /// Our `OK <port>` handshake reply, not yet written to the host socket.
    reply: Vec<u8>,
    /// Guest data not yet written to the host socket.
    to_host: VecDeque<u8>,
    /// The host socket reported readable and has not been read to EAGAIN since.
    pub host_readable: bool,
    /// The host socket reached EOF; the guest has been told.
    pub host_eof: bool,
    /// The guest will send no more: shut the host socket's write side once flushed.
    guest_done_sending: bool,
    /// Bytes of guest data written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    advertised_fwd_cnt: Wrapping<u32>,
    /// Bytes of host data sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
}

impl Connection {
    pub fn new(key: ConnectionKey, stream: UnixStream, state: State) -> Self {
        Self {
            key,
            stream,
            state,
            reply: Vec::new(),
            to_host: VecDeque::new(),
            host_readable: true,
            host_eof: false,
            guest_done_sending: false,
            fwd_cnt: Wrapping(0),
            advertised_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// A header for a packet to the guest on this connection, carrying our
    /// current credit.
    pub fn header(&mut self, guest_cid: u64, op: u16) -> PacketHeader {
        self.advertised_fwd_cnt = self.fwd_cnt;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: BUFFER_SIZE,
            fwd_cnt: self.fwd_cnt.0,
            ..Default::default()
        }
    }

    /// Records the credit the guest advertises in each of its packets.
    pub fn update_peer_credit(&mut self, header: &PacketHeader) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data could go to the guest now.
    pub fn wants_to_send(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_free() > 0
    }

    /// Reads host data for one rx packet of at most `max` bytes. `Ok(0)` is EOF.
    pub fn read_host(&mut self, buf: &mut [u8], max: usize) -> io::Result<usize> {
        let len = max.min(buf.len()).min(self.peer_free() as usize);
        match self.stream.read(&mut buf[..len]) {
            Ok(n) => {
                self.rx_cnt += Wrapping(n as u32);
                if n == 0 {
                    self.host_eof = true;
                }
                Ok(n)
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.host_readable = false;
                }
                Err(e)
            }
        }
    }

    /// Queues our handshake reply, which goes out before any guest data.
    pub fn reply_to_host(&mut self, line: &[u8]) {
        self.reply.extend_from_slice(line);
    }

    /// Guest data for the host. Returns false when the guest overran the
    /// credit we gave it.
    pub fn push_to_host(&mut self, data: &[u8]) -> bool {
        self.to_host.extend(data);
        self.to_host.len() <= BUFFER_SIZE as usize + 64
    }

    pub fn guest_done_sending(&mut self) {
        self.guest_done_sending = true;
    }

    pub fn has_data_for_host(&self) -> bool {
        !self.to_host.is_empty() || !self.reply.is_empty()
    }

    /// Writes what the host socket takes. Errors other than EAGAIN mean the
    /// host end is gone.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.reply.is_empty() {
            match self.stream.write(&self.reply) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => drop(self.reply.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Whether the guest should hear about freed buffer space now: once it
    /// believes less than half of our buffer is free and we have forwarded more.
    pub fn needs_credit_update(&self) -> bool {
        let unadvertised = (self.fwd_cnt - self.advertised_fwd_cnt).0;
        let held_by_us =
            (self.fwd_cnt + Wrapping(self.to_host.len() as u32) - self.advertised_fwd_cnt).0;
        let believed_free = BUFFER_SIZE.saturating_sub(held_by_us);
        unadvertised > 0 && believed_free < BUFFER_SIZE / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = ConnectionKey {
            local_port: 1 << 30,
            peer_port: 1024,
        };
        (Connection::new(key, ours, State::Established), theirs)
    }

    #[test]
    fn never_sends_more_than_the_guest_has_room_for() {
        let (mut conn, mut host) = connection();
        conn.update_peer_credit(&PacketHeader {
            buf_alloc: 10,
            fwd_cnt: 0,
            ..Default::default()
        });
        host.write_all(&[7u8; 100]).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(conn.read_host(&mut buf, 64).unwrap(), 10);
        assert_eq!(conn.peer_free(), 0);
        assert!(!conn.wants_to_send());
        // The guest consumed 4 bytes.
        conn.update_peer_credit(&PacketHeader {
            buf_alloc: 10,
            fwd_cnt: 4,
            ..Default::default()
        });
        assert_eq!(conn.peer_free(), 4);
        assert_eq!(conn.read_host(&mut buf, 64).unwrap(), 4);
    }

    #[test]
    fn forwards_to_the_host_and_asks_for_credit_updates_when_the_guest_runs_low() {
        let (mut conn, mut host) = connection();
        let chunk = vec![1u8; (BUFFER_SIZE / 4) as usize];
        assert!(conn.push_to_host(&chunk));
        conn.flush_to_host().unwrap();
        // The guest still believes 3/4 of the buffer is free.
        assert!(!conn.needs_credit_update());
        assert!(conn.push_to_host(&chunk));
        assert!(conn.push_to_host(&chunk));
        conn.flush_to_host().unwrap();
        let mut got = vec![0u8; chunk.len() * 3];
        host.read_exact(&mut got).unwrap();
        assert!(conn.needs_credit_update());
        let header = conn.header(3, super::super::packet::OP_CREDIT_UPDATE);
        assert_eq!({ header.fwd_cnt }, BUFFER_SIZE / 4 * 3);
        assert!(!conn.needs_credit_update());
    }

    #[test]
    fn detects_a_guest_overrunning_its_credit() {
        let (mut conn, _host) = connection();
        assert!(conn.push_to_host(&vec![0u8; BUFFER_SIZE as usize]));
        assert!(!conn.push_to_host(&vec![0u8; 4096]));
    }

    #[test]
    fn host_eof_is_a_zero_read() {
        let (mut conn, host) = connection();
        conn.update_peer_credit(&PacketHeader {
            buf_alloc: 100,
            ..Default::default()
        });
        drop(host);
        let mut buf = [0u8; 8];
        assert_eq!(conn.read_host(&mut buf, 8).unwrap(), 0);
        assert!(conn.host_eof);
    }
}

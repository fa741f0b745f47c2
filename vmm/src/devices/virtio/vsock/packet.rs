//! The virtio-vsock wire format: the 44-byte packet header that precedes
//! every packet on the rx and tx queues (virtio spec 1.2, 5.10.6).

use vm_memory::ByteValued;

/// Connection-oriented stream socket, the only type we carry.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The CID of the host, as seen from the guest.
pub const HOST_CID: u64 = 2;

/// `struct virtio_vsock_hdr`, little-endian on the wire (x86_64 is too).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

// SAFETY: plain old data made only of integers, packed, with no padding;
// every bit pattern is a valid header.
unsafe impl ByteValued for PacketHeader {}

pub const HEADER_SIZE: usize = std::mem::size_of::<PacketHeader>();

/// The two ends of one stream connection, named from the host's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionKey {
    /// Our (host) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
}

impl PacketHeader {
    /// The connection a packet from the guest belongs to.
    pub fn key_from_guest(&self) -> ConnectionKey {
        ConnectionKey {
            local_port: self.dst_port,
            peer_port: self.src_port,
        }
    }

    pub fn op_name(&self) -> &'static str {
        match self.op {
            OP_REQUEST => "REQUEST",
            OP_RESPONSE => "RESPONSE",
            OP_RST => "RST",
            OP_SHUTDOWN => "SHUTDOWN",
            OP_RW => "RW",
            OP_CREDIT_UPDATE => "CREDIT_UPDATE",
            OP_CREDIT_REQUEST => "CREDIT_REQUEST",
            _ => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_44_bytes_little_endian() {
        assert_eq!(HEADER_SIZE, 44);
        let header = PacketHeader {
            src_cid: 2,
            dst_cid: 3,
            src_port: 0x0102_0304,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 0x10000,
            fwd_cnt: 7,
        };
        let bytes = header.as_slice();
        assert_eq!(&bytes[0..8], &2u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &0x0102_0304u32.to_le_bytes());
        assert_eq!(&bytes[28..30], &1u16.to_le_bytes());
        assert_eq!(&bytes[30..32], &5u16.to_le_bytes());
        assert_eq!(&bytes[40..44], &7u32.to_le_bytes());
    }
}

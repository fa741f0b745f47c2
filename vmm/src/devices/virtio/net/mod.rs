//! virtio-net (device type 1) on a host tap device.
//!
//! - [`device`]: the virtio device: features, the 12-byte config space,
//!   activation and reset, and moving frames between the queues and the tap;
//! - [`event_handler`]: the event-loop glue (queue notifications, tap
//!   readiness, edge-triggered);
//! - [`tap`]: the host backend: checking and configuring the tap fd
//!   (vnet header size, offloads), `readv`/`writev`;
//! - [`iov`]: a descriptor chain turned into a fixed array of iovecs over
//!   guest memory (no allocation per frame);
//! - this module: constants, errors and the device's configuration.
//!
//! The 12-byte `virtio_net_hdr_v1` (VERSION_1) is what the tap reads and
//! writes too (`TUNSETVNETHDRSZ 12`): a guest TX chain is one tap write, one
//! tap read fills one guest RX chain; frames are never copied by the VMM.

pub mod device;
pub mod event_handler;
pub mod iov;
pub mod tap;
#[cfg(test)]
mod test_tap;
#[cfg(test)]
mod tests;

use std::os::fd::RawFd;

pub use device::Net;

pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Where `num_buffers` (le16) sits in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
pub const ETH_HLEN: usize = 14;
/// The largest frame with its header: a 64 KiB GSO frame, its Ethernet
/// header and the vnet header (what Linux posts as one "big" RX buffer).
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65550;
/// The MTU the guest is told when none is configured.
pub const DEFAULT_MTU: u16 = 1500;
/// The smallest MTU Linux accepts from the config space (ETH_MIN_MTU).
pub use protocols::vmm::MIN_MTU;
/// The config space: mac[6], status le16, max_virtqueue_pairs le16, mtu le16.
pub const CONFIG_SPACE_SIZE: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("fd {fd} is not an open file descriptor of this process")]
    BadFd {
        fd: RawFd,
        #[source]
        error: std::io::Error,
    },
    #[error("fd {fd} is not a tap device")]
    NotATap {
        fd: RawFd,
        #[source]
        error: std::io::Error,
    },
    #[error("tap {name} (fd {fd}) was opened without {missing}: open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    TapFlags {
        fd: RawFd,
        name: String,
        missing: &'static str,
    },
    #[error("opening tap {name}")]
    OpenTap {
        name: String,
        #[source]
        error: std::io::Error,
    },
    #[error("configuring tap {name}: {what}")]
    TapSetup {
        name: String,
        what: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("creating the virtio-net device: {0}")]
    Setup(String),
}

/// A NIC's configuration and its `--net` syntax are the runtime's and
/// the VMM's shared contract.
pub use protocols::vmm::{parse_mac, NetConfig, NetConfigError, TapSource};

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
use std::str::FromStr;

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
pub const MIN_MTU: u16 = 68;
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

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// An fd inherited from the parent, opened with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; the device takes ownership of it.
    Fd(RawFd),
    /// A tap opened (created if needed) by name in the VMM's own netns.
    Name(String),
}

/// One NIC: `fd=N|tap=NAME,mac=aa:bb:cc:dd:ee:ff[,mtu=M]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSource,
    pub mac: [u8; 6],
    /// The MTU the guest is given (its `max_mtu`); [`DEFAULT_MTU`] when unset.
    pub mtu: Option<u16>,
}

/// Why a `--net` value was refused: the part named, and what is expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{part:?}: {expected}")]
pub struct NetConfigError {
    pub part: String,
    pub expected: &'static str,
}

fn bad(part: &str, expected: &'static str) -> NetConfigError {
    NetConfigError {
        part: part.to_string(),
        expected,
    }
}

/// `aa:bb:cc:dd:ee:ff` (hex, either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        let mut mtu = None;
        for part in value.split(',') {
            let (key, val) = part
                .split_once('=')
                .ok_or_else(|| bad(part, "expected KEY=VALUE (keys: fd, tap, mac, mtu)"))?;
            match key {
                "fd" | "tap" if tap.is_some() => {
                    return Err(bad(part, "give exactly one of fd= or tap="))
                }
                "fd" => {
                    let fd: RawFd = val
                        .parse()
                        .ok()
                        .filter(|fd| *fd >= 0)
                        .ok_or_else(|| bad(part, "fd= takes a file descriptor number"))?;
                    tap = Some(TapSource::Fd(fd));
                }
                "tap" => {
                    if val.is_empty() || val.len() >= libc::IFNAMSIZ || val.contains('/') {
                        return Err(bad(part, "tap= takes an interface name of 1 to 15 bytes"));
                    }
                    tap = Some(TapSource::Name(val.to_string()));
                }
                "mac" if mac.is_some() => return Err(bad(part, "mac= given twice")),
                "mac" => {
                    let parsed = parse_mac(val)
                        .ok_or_else(|| bad(part, "mac= takes six hex bytes aa:bb:cc:dd:ee:ff"))?;
                    if parsed[0] & 1 != 0 {
                        return Err(bad(part, "mac= must be a unicast address"));
                    }
                    mac = Some(parsed);
                }
                "mtu" if mtu.is_some() => return Err(bad(part, "mtu= given twice")),
                "mtu" => {
                    mtu = Some(
                        val.parse::<u16>()
                            .ok()
                            .filter(|mtu| *mtu >= MIN_MTU)
                            .ok_or_else(|| bad(part, "mtu= takes a number from 68 to 65535"))?,
                    );
                }
                _ => return Err(bad(part, "unknown key (keys: fd, tap, mac, mtu)")),
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or_else(|| bad(value, "fd=N or tap=NAME is required"))?,
            mac: mac.ok_or_else(|| bad(value, "mac=aa:bb:cc:dd:ee:ff is required"))?,
            mtu,
        })
    }
}

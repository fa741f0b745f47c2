//! Guest networking over rtnetlink, in the agent's own (the VM's) network
//! namespace: the NIC the host gave us is renamed and addressed like the
//! pod's veth ([`link`]), its routes ([`route`]) and static neighbour
//! entries ([`neighbour`]) are copied in.
//!
//! The agent is synchronous: each call builds a current-thread tokio
//! runtime, opens one netlink socket on it and drops both at the end
//! ([`run`]). Changes are serialised by one lock, so two calls never race
//! on a rename.

mod link;
mod neighbour;
mod route;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Mutex;

use futures_util::TryStreamExt;
use protocols::agent::{IpAddress, IpFamily};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::Handle;

pub use link::{read_interface, update_interface};
pub use neighbour::{add_arp_neighbors, list_neighbors};
pub use route::{list_routes, update_routes};

/// What went wrong, naming the item that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request itself is wrong (bad address, unknown MAC or device…).
    #[error("{0}")]
    InvalidArgument(String),
    /// The kernel refused a netlink request.
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The tokio runtime or the netlink socket could not be set up.
    #[error("opening netlink")]
    Setup(#[source] std::io::Error),
}

impl NetworkError {
    /// The errno the kernel answered, for a refused netlink request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetworkError::Netlink { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, NetworkError>;

fn invalid(message: impl Into<String>) -> NetworkError {
    NetworkError::InvalidArgument(message.into())
}

/// Maps an rtnetlink error to [`NetworkError::Netlink`] for `what`.
fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |error| {
        let source = match error {
            rtnetlink::Error::NetlinkError(message) => message.to_io(),
            other => std::io::Error::other(other.to_string()),
        };
        NetworkError::Netlink { what, source }
    }
}

/// Serialises every change this module makes.
static LOCK: Mutex<()> = Mutex::new(());

/// Runs `body` with a netlink handle on a fresh current-thread runtime on
/// the calling thread (whose network namespace the socket belongs to).
fn run<T, F, Fut>(body: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(NetworkError::Setup)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Setup)?;
        let connection = tokio::spawn(connection);
        let result = body(handle).await;
        connection.abort();
        result
    })
}

/// Every link of the namespace.
async fn dump_links(handle: &Handle) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing links"))
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.as_str()),
            _ => None,
        })
}

/// The index of the link named `name`, or an error saying what needed it.
fn index_of_link(links: &[LinkMessage], name: &str, what: impl std::fmt::Display) -> Result<u32> {
    links
        .iter()
        .find(|link| link_name(link) == Some(name))
        .map(|link| link.header.index)
        .ok_or_else(|| invalid(format!("{what}: no guest link named {name:?}")))
}

fn link_mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Address(mac) => Some(mac.as_slice()),
            _ => None,
        })
}

/// The index of the link named `name`; `for_what` says who asked.
async fn link_index(handle: &Handle, name: &str, for_what: &str) -> Result<u32> {
    if name.is_empty() {
        return Err(invalid(format!("{for_what}: no device given")));
    }
    dump_links(handle)
        .await?
        .iter()
        .find(|link| link_name(link) == Some(name))
        .map(|link| link.header.index)
        .ok_or_else(|| invalid(format!("{for_what}: no guest link named {name:?}")))
}

/// The name of link `index`, or its number when it has none.
fn name_of(links: &[LinkMessage], index: u32) -> String {
    links
        .iter()
        .find(|link| link.header.index == index)
        .and_then(link_name)
        .map_or_else(|| format!("if{index}"), str::to_string)
}

/// "aa:bb:cc:dd:ee:ff" (any case, 1 to 32 octets) as bytes.
fn parse_lladdr(text: &str) -> Result<Vec<u8>> {
    let bad = || invalid(format!("bad link-layer address {text:?}"));
    let bytes = text
        .split(':')
        .map(|octet| {
            if octet.is_empty() || octet.len() > 2 {
                return Err(bad());
            }
            u8::from_str_radix(octet, 16).map_err(|_| bad())
        })
        .collect::<Result<Vec<u8>>>()?;
    if bytes.is_empty() || bytes.len() > 32 {
        return Err(bad());
    }
    Ok(bytes)
}

/// An Ethernet MAC (six octets).
fn parse_mac(text: &str) -> Result<[u8; 6]> {
    parse_lladdr(text)?
        .try_into()
        .map_err(|_| invalid(format!("bad MAC {text:?}: not six octets")))
}

/// Bytes as "aa:bb:cc:dd:ee:ff".
fn format_lladdr(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_ip(text: &str, what: &str) -> Result<IpAddr> {
    text.trim()
        .parse()
        .map_err(|_| invalid(format!("bad {what} {text:?}")))
}

/// "10.0.0.0/24" or a bare address (a host prefix); host bits must be clear.
fn parse_cidr(text: &str, what: &str) -> Result<(IpAddr, u8)> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address = parse_ip(address, what)?;
    let max = max_prefix(address);
    let prefix = match prefix {
        None => max,
        Some(prefix) => prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| invalid(format!("bad {what} {text:?}: bad prefix length")))?,
    };
    if mask(address, prefix) != address {
        return Err(invalid(format!(
            "bad {what} {text:?}: host bits set (the network is {}/{prefix})",
            mask(address, prefix)
        )));
    }
    Ok((address, prefix))
}

fn max_prefix(address: IpAddr) -> u8 {
    if address.is_ipv4() {
        32
    } else {
        128
    }
}

/// `address` with all but the first `prefix` bits cleared.
fn mask(address: IpAddr, prefix: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & keep).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & keep).into())
        }
    }
}

fn family_of(address: IpAddr) -> IpFamily {
    if address.is_ipv4() {
        IpFamily::V4
    } else {
        IpFamily::V6
    }
}

/// An [`IpAddress`] as (address, prefix length), checked against its family
/// and the family's longest prefix.
fn parse_ip_address(ip: &IpAddress) -> Result<(IpAddr, u8)> {
    let address = parse_ip(&ip.address, "address")?;
    match ip.family.enum_value() {
        Ok(family) if family == family_of(address) => {}
        Ok(family) => {
            return Err(invalid(format!(
                "bad address {:?}: not of family {family:?}",
                ip.address
            )))
        }
        Err(n) => {
            return Err(invalid(format!(
                "bad address {:?}: unknown family {n}",
                ip.address
            )))
        }
    }
    let prefix = u8::try_from(ip.prefix_len)
        .ok()
        .filter(|p| *p <= max_prefix(address))
        .ok_or_else(|| {
            invalid(format!(
                "bad address {:?}: prefix length {} out of range",
                ip.address, ip.prefix_len
            ))
        })?;
    Ok((address, prefix))
}

fn ip_address(address: IpAddr, prefix: u8) -> IpAddress {
    IpAddress {
        family: family_of(address).into(),
        address: address.to_string(),
        prefix_len: prefix.into(),
        ..Default::default()
    }
}

/// fe80::/10.
fn is_ipv6_link_local(address: IpAddr) -> bool {
    matches!(address, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

//! `microvm run --net`: what CNI would have built for a pod, built by hand
//! (design section 6), then wired as a pod's network is.
//!
//! An anonymous network namespace (gone when microvm exits, however it
//! exits, taking its veth pair along) holds `eth0` = one end of a veth
//! pair, `10.201.N.2/30`, default route via `10.201.N.1`, which the other
//! end `mvh<pid>` has in our namespace. N is the first /30 of the pool
//! (`10.201.0.0/16`, or `--net-subnet`) with no local address in it.
//! Outbound NAT is the user's: see [`NAT_HINT`].

use std::fmt;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::str::FromStr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::netns::{self, Ns};
use super::{link_index, tcfilter, NetworkError, PodNetwork};

/// The pool the /30 comes from by default.
pub const DEFAULT_POOL: Subnet = Subnet {
    network: Ipv4Addr::new(10, 201, 0, 0),
    prefix_len: 16,
};

/// How to let the VM reach beyond this host (the usage text shows it).
pub const NAT_HINT: &str = "sysctl -w net.ipv4.ip_forward=1; \
iptables -t nat -A POSTROUTING -s 10.201.0.0/16 ! -o mvh+ -j MASQUERADE";

/// The guest's interface name inside the namespace.
const GUEST_LINK: &str = "eth0";

/// An IPv4 network, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = String;

    /// `a.b.c.d/len` with len ≤ 30 (room for one /30); host bits are
    /// cleared.
    fn from_str(s: &str) -> Result<Self, String> {
        let (address, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: give an IPv4 CIDR such as 10.201.0.0/16"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{s}: {address} is not an IPv4 address"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 30)
            .ok_or_else(|| format!("{s}: the prefix length must be 0 to 30"))?;
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len)
        };
        Ok(Subnet {
            network: Ipv4Addr::from(u32::from(address) & mask),
            prefix_len,
        })
    }
}

impl Subnet {
    /// The /30 blocks of this subnet, in order.
    fn blocks(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.network);
        let count = 1u64 << (30 - self.prefix_len);
        (0..count).map(move |i| Ipv4Addr::from(base.wrapping_add((i as u32) << 2)))
    }
}

/// The first /30 of `pool` holding none of `used`.
pub fn free_block(pool: Subnet, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    pool.blocks().find(|block| {
        let start = u32::from(*block);
        used.iter()
            .all(|a| !(start..=start + 3).contains(&u32::from(*a)))
    })
}

/// The network `microvm run --net` made; deleted by [`close`] or on drop.
///
/// [`close`]: StandaloneNetwork::close
pub struct StandaloneNetwork {
    pod: PodNetwork,
    host_link: String,
    host_address: Ipv4Addr,
    guest_address: Ipv4Addr,
    _netns: File,
    closed: bool,
}

/// Holds `/run/lock/microvm-net.lock` (or the temp dir's) while a /30 is
/// chosen and taken, so that concurrent runs pick different ones.
fn subnet_lock() -> Option<nix::fcntl::Flock<File>> {
    let dirs = [std::path::PathBuf::from("/run/lock"), std::env::temp_dir()];
    for dir in dirs {
        let path = dir.join("microvm-net.lock");
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive) {
            Ok(lock) => return Some(lock),
            Err((_, e)) => tracing::warn!("locking {}: {e}", path.display()),
        }
    }
    None
}

/// Deletes link `name` (a veth: its peer goes along); a link already gone
/// is no error.
async fn delete_link(ns: &Ns, name: &str) -> Result<(), NetworkError> {
    let index = match link_index(ns, name).await {
        Ok(index) => index,
        Err(NetworkError::Netlink { error, .. })
            if tcfilter::errno(&error) == Some(libc::ENODEV) =>
        {
            return Ok(())
        }
        Err(NetworkError::Invalid { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    match ns.handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if tcfilter::errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(ns.fail(name, "deleting the link")(e)),
    }
}

/// Deletes the host link it names when dropped, unless emptied first.
struct HostLink(Option<String>);

impl Drop for HostLink {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            delete_host_link(&name);
        }
    }
}

fn delete_host_link(name: &str) {
    let name = name.to_string();
    if let Err(e) = netns::run_here(|ns| async move { delete_link(&ns, &name).await }) {
        tracing::warn!(
            "deleting the VM's host link: {}",
            protocols::error_chain(&e)
        );
    }
}

/// In our namespace: picks the /30, creates the veth pair, moves the peer
/// into `netns`, addresses and raises the host end. Returns the /30.
async fn make_host_side(
    ns: &Ns,
    pool: Subnet,
    host: &str,
    peer: &str,
    netns_fd: i32,
) -> Result<Ipv4Addr, NetworkError> {
    let addresses: Vec<AddressMessage> = ns
        .handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(ns.fail("", "listing addresses"))?;
    let used: Vec<Ipv4Addr> = addresses
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(v4)) | AddressAttribute::Address(IpAddr::V4(v4)) => {
                Some(*v4)
            }
            _ => None,
        })
        .collect();
    let block = free_block(pool, &used).ok_or_else(|| NetworkError::Invalid {
        netns: ns.label.clone(),
        message: format!("no free /30 left in {pool}"),
    })?;
    ns.handle
        .link()
        .add(LinkVeth::new(host, peer).build())
        .execute()
        .await
        .map_err(ns.fail(host, "creating the veth pair"))?;
    let result = async {
        let peer_index = link_index(ns, peer).await?;
        ns.handle
            .link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .setns_by_fd(netns_fd)
                    .build(),
            )
            .execute()
            .await
            .map_err(ns.fail(peer, "moving the veth into the VM's namespace"))?;
        let host_index = link_index(ns, host).await?;
        let host_address = Ipv4Addr::from(u32::from(block) + 1);
        ns.handle
            .address()
            .add(host_index, IpAddr::V4(host_address), 30)
            .execute()
            .await
            .map_err(ns.fail(host, "adding the host address"))?;
        ns.handle
            .link()
            .set(LinkUnspec::new_with_index(host_index).up().build())
            .execute()
            .await
            .map_err(ns.fail(host, "bringing the host end up"))
    }
    .await;
    if let Err(e) = result {
        if let Err(undo) = delete_link(ns, host).await {
            tracing::warn!("deleting {host} after a failure: {undo}");
        }
        return Err(e);
    }
    Ok(block)
}

/// Inside the VM's namespace: `peer` becomes eth0 with the guest address
/// and a default route via the host end; lo up.
async fn make_guest_side(ns: &Ns, peer: &str, block: Ipv4Addr) -> Result<(), NetworkError> {
    let host_address = Ipv4Addr::from(u32::from(block) + 1);
    let guest_address = Ipv4Addr::from(u32::from(block) + 2);
    let index = link_index(ns, peer).await?;
    ns.handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .name(GUEST_LINK.to_string())
                .build(),
        )
        .execute()
        .await
        .map_err(ns.fail(peer, "renaming the veth to eth0"))?;
    ns.handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(ns.fail(GUEST_LINK, "bringing the link up"))?;
    ns.handle
        .address()
        .add(index, IpAddr::V4(guest_address), 30)
        .execute()
        .await
        .map_err(ns.fail(GUEST_LINK, "adding the guest address"))?;
    ns.handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(host_address)
                .output_interface(index)
                .build(),
        )
        .execute()
        .await
        .map_err(ns.fail(GUEST_LINK, "adding the default route"))?;
    let lo = link_index(ns, "lo").await?;
    ns.handle
        .link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(ns.fail("lo", "bringing the loopback up"))
}

impl StandaloneNetwork {
    /// Builds the namespace and veth pair and wires them for a VM. `pool`:
    /// where the /30 comes from ([`DEFAULT_POOL`] when None).
    pub fn create(pool: Option<Subnet>) -> Result<StandaloneNetwork, NetworkError> {
        let pool = pool.unwrap_or(DEFAULT_POOL);
        let netns = netns::create_anonymous()?;
        let pid = std::process::id();
        let host = format!("mvh{pid}");
        let peer = format!("mvp{pid}");
        let netns_fd = netns.as_raw_fd();
        let block = {
            let _lock = subnet_lock();
            let (host, peer) = (host.clone(), peer.clone());
            netns::run_here(
                |ns| async move { make_host_side(&ns, pool, &host, &peer, netns_fd).await },
            )?
        };
        // From here on a failure deletes the host end (and so the pair).
        let mut guard = HostLink(Some(host));
        netns::run_in(&netns, |ns| async move {
            make_guest_side(&ns, &peer, block).await
        })?;
        let wiring = netns.try_clone().map_err(|source| NetworkError::Io {
            netns: netns::describe(&netns),
            link: String::new(),
            step: "duplicating the namespace fd",
            error: source,
        })?;
        let pod = PodNetwork::wire(wiring)?;
        let network = StandaloneNetwork {
            pod,
            host_link: guard.0.take().unwrap_or_default(),
            host_address: Ipv4Addr::from(u32::from(block) + 1),
            guest_address: Ipv4Addr::from(u32::from(block) + 2),
            _netns: netns,
            closed: false,
        };
        tracing::info!(
            "VM network: {} {}/30 <-> eth0 {}/30",
            network.host_link,
            network.host_address,
            network.guest_address
        );
        Ok(network)
    }

    /// The wiring, for the taps and the agent calls.
    pub fn pod(&mut self) -> &mut PodNetwork {
        &mut self.pod
    }

    /// The host end of the veth pair (`mvh<pid>`).
    pub fn host_link(&self) -> &str {
        &self.host_link
    }

    pub fn host_address(&self) -> Ipv4Addr {
        self.host_address
    }

    pub fn guest_address(&self) -> Ipv4Addr {
        self.guest_address
    }

    /// Unwires and deletes the host end (the namespace goes with the last
    /// fd). Idempotent.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.pod.tear_down();
        delete_host_link(&self.host_link);
    }
}

impl Drop for StandaloneNetwork {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_mask() {
        assert_eq!(
            "10.201.3.7/24".parse::<Subnet>(),
            Ok(Subnet {
                network: Ipv4Addr::new(10, 201, 3, 0),
                prefix_len: 24
            })
        );
        for bad in ["10.0.0.0", "10.0.0.0/31", "fd00::/64", "10.0.0.0/x", "x/16"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_first_unused_block_is_chosen() {
        let pool = DEFAULT_POOL;
        assert_eq!(free_block(pool, &[]), Some(Ipv4Addr::new(10, 201, 0, 0)));
        let used = [Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 6)];
        assert_eq!(free_block(pool, &used), Some(Ipv4Addr::new(10, 201, 0, 8)));
        let one: Subnet = "192.168.9.4/30".parse().unwrap();
        assert_eq!(free_block(one, &[]), Some(Ipv4Addr::new(192, 168, 9, 4)));
        assert_eq!(free_block(one, &[Ipv4Addr::new(192, 168, 9, 5)]), None);
        let whole: Subnet = "0.0.0.0/0".parse().unwrap();
        assert_eq!(whole.blocks().nth(3), Some(Ipv4Addr::new(0, 0, 0, 12)));
    }
}

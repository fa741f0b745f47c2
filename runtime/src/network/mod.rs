//! Pod networking, host side (docs/design/pod-networking.md, sections 2, 3
//! and 6): the pod's network namespace (made by CNI, or by
//! `microvm run --net`) keeps its veths as they are; per veth a tap
//! `tap{i}_mvm` is created next to it and joined to it by tc (ingress
//! qdiscs, u32 match-all filters with mirred egress redirects, both ways);
//! the tap's fd goes to the VMM's virtio-net device and the guest agent
//! gives the guest NIC the veth's name, MAC, MTU, addresses, routes and
//! static neighbours.
//!
//! Threads: netlink runs on short-lived threads that enter the namespace
//! ([`netns::run_in`]); no other thread ever changes its network namespace.

pub mod netns;
pub mod scan;
pub mod standalone;
pub mod tap;
pub mod tcfilter;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use anyhow::Context;
use futures_util::TryStreamExt;
use protocols::agent;
use protocols::agent_ttrpc::AgentServiceClient;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::LinkUnspec;

pub use scan::{format_mac, GuestInterface, GuestNeighbour, GuestRoute, IpCidr, Scan};

use netns::Ns;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("entering network namespace {netns}")]
    EnterNetns {
        netns: String,
        #[source]
        error: std::io::Error,
    },
    #[error("network namespace {netns}: {step}{}", on_link(link))]
    Netlink {
        netns: String,
        link: String,
        step: &'static str,
        #[source]
        error: Box<rtnetlink::Error>,
    },
    #[error("network namespace {netns}: {step}{}", on_link(link))]
    Io {
        netns: String,
        link: String,
        step: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("network namespace {netns}: the netlink thread panicked")]
    Panicked { netns: String },
    #[error("network namespace {netns}: {message}")]
    Invalid { netns: String, message: String },
}

fn on_link(link: &str) -> String {
    if link.is_empty() {
        String::new()
    } else {
        format!(" (link {link})")
    }
}

/// One guest NIC: the tap the VMM's virtio-net device reads and writes, and
/// what the device tells the guest driver.
#[derive(Debug)]
pub struct NetAttachment {
    pub tap: OwnedFd,
    /// The veth's MAC, which the guest NIC takes.
    pub mac: [u8; 6],
    pub mtu: u32,
}

impl NetAttachment {
    /// The VMM's NIC, for the tap on fd `fd` in the VMM.
    pub fn vmm_nic(&self, fd: i32) -> protocols::vmm::NetConfig {
        protocols::vmm::NetConfig {
            tap: protocols::vmm::TapSource::Fd(fd),
            mac: self.mac,
            // Linux's interfaces go up to 65535 (ETH_MAX_MTU).
            mtu: Some(self.mtu.min(u32::from(u16::MAX)) as u16),
        }
    }
}

/// The guest NICs of a sandbox ([`crate::config::SandboxConfig::net`]).
/// [`crate::sandbox::Sandbox::start`] takes the taps out: from then on the
/// VMM holds the only copy of each, so a tap lives exactly as long as its
/// VMM.
#[derive(Debug, Default)]
pub struct NetDevices(Mutex<Vec<NetAttachment>>);

impl NetDevices {
    pub fn push(&mut self, attachment: NetAttachment) {
        self.list().push(attachment);
    }

    pub fn len(&self) -> usize {
        self.list().len()
    }

    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }

    /// Takes the attachments out (later calls get none).
    pub fn take(&self) -> Vec<NetAttachment> {
        std::mem::take(&mut *self.list())
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<NetAttachment>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl From<Vec<NetAttachment>> for NetDevices {
    fn from(attachments: Vec<NetAttachment>) -> Self {
        NetDevices(Mutex::new(attachments))
    }
}

/// A pod's network namespace wired for a VM: taps created and joined to
/// the veths, and what the guest agent must be told. Dropping it tears the
/// wiring down as [`PodNetwork::tear_down`] does.
pub struct PodNetwork {
    netns: File,
    label: String,
    scan: Scan,
    attachments: Vec<NetAttachment>,
    /// The veths have our ingress qdiscs.
    wired: bool,
}

impl std::fmt::Debug for PodNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNetwork")
            .field("netns", &self.label)
            .field("scan", &self.scan)
            .field("attachments", &self.attachments.len())
            .field("wired", &self.wired)
            .finish()
    }
}

/// The ifindex of link `name`.
pub(crate) async fn link_index(ns: &Ns, name: &str) -> Result<u32, NetworkError> {
    let links: Vec<LinkMessage> = ns
        .handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_collect()
        .await
        .map_err(ns.fail(name, "looking the link up"))?;
    links
        .first()
        .map(|l| l.header.index)
        .ok_or_else(|| NetworkError::Invalid {
            netns: ns.label.clone(),
            message: format!("link {name} not found"),
        })
}

/// The name of link `index`, None if there is no such link.
async fn link_name(ns: &Ns, index: u32) -> Result<Option<String>, NetworkError> {
    let links: Result<Vec<LinkMessage>, _> = ns
        .handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect()
        .await;
    match links {
        Ok(links) => Ok(links.first().and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            })
        })),
        Err(e) if tcfilter::errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(ns.fail("", "looking a link up")(e)),
    }
}

/// Creates the tap for `interface` (the `position`th veth) and joins them.
async fn wire_one(
    ns: &Ns,
    position: usize,
    interface: &GuestInterface,
) -> Result<NetAttachment, NetworkError> {
    let tap_name = tap::name(position);
    let tap = tap::open(&tap_name).map_err(ns.io_fail(&tap_name, "creating the tap"))?;
    let tap_index = link_index(ns, &tap_name).await?;
    ns.handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(interface.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(ns.fail(&tap_name, "setting the tap's MTU and bringing it up"))?;
    tcfilter::add_ingress_qdisc(ns, tap_index, &tap_name).await?;
    tcfilter::add_ingress_qdisc(ns, interface.index, &interface.name).await?;
    tcfilter::add_redirect(ns, interface.index, &interface.name, tap_index).await?;
    tcfilter::add_redirect(ns, tap_index, &tap_name, interface.index).await?;
    tracing::info!(
        "{}: {} ({}, MTU {}) wired to {tap_name}",
        ns.label,
        interface.name,
        format_mac(&interface.mac),
        interface.mtu
    );
    Ok(NetAttachment {
        tap,
        mac: interface.mac,
        mtu: interface.mtu,
    })
}

/// Removes our ingress qdiscs from `interfaces`, skipping veths that are
/// gone (or whose index now names another link).
async fn unwire(ns: &Ns, interfaces: &[GuestInterface]) -> Result<(), NetworkError> {
    for interface in interfaces {
        match link_name(ns, interface.index).await? {
            Some(name) if name == interface.name => {
                tcfilter::del_ingress_qdisc(ns, interface.index, &interface.name).await?;
                tracing::debug!("{}: {} unwired", ns.label, interface.name);
            }
            _ => tracing::debug!("{}: {} is gone", ns.label, interface.name),
        }
    }
    Ok(())
}

impl PodNetwork {
    /// Scans `netns` (an open /var/run/netns/... or /proc/<pid>/ns/net) for
    /// veth interfaces (skipping lo), creates `tap{i}_mvm` per veth in that
    /// namespace (opened, not persistent), MTU = the veth's, up, and
    /// installs the tc ingress qdiscs and u32 match-all mirred redirect
    /// filters both ways. No veth: an empty PodNetwork. On failure nothing
    /// is left behind.
    pub fn wire(netns: File) -> Result<PodNetwork, NetworkError> {
        let label = netns::describe(&netns);
        let (scan, attachments) = netns::run_in(&netns, |ns| async move {
            let scan = scan::scan(&ns).await?;
            let mut attachments = Vec::new();
            for (position, interface) in scan.interfaces.iter().enumerate() {
                match wire_one(&ns, position, interface).await {
                    Ok(attachment) => attachments.push(attachment),
                    Err(e) => {
                        drop(attachments);
                        if let Err(undo) = unwire(&ns, &scan.interfaces[..=position]).await {
                            tracing::warn!("undoing a failed wiring: {undo}");
                        }
                        return Err(e);
                    }
                }
            }
            Ok((scan, attachments))
        })?;
        if scan.interfaces.is_empty() {
            tracing::info!("{label}: no veth, no guest NIC");
        }
        Ok(PodNetwork {
            netns,
            label,
            wired: !scan.interfaces.is_empty(),
            scan,
            attachments,
        })
    }

    /// The taps for the VMM, taken once (later calls return none).
    pub fn take_attachments(&mut self) -> Vec<NetAttachment> {
        std::mem::take(&mut self.attachments)
    }

    /// The veths, as the guest NICs must look.
    pub fn interfaces(&self) -> &[GuestInterface] {
        &self.scan.interfaces
    }

    /// The routes the guest gets.
    pub fn routes(&self) -> &[GuestRoute] {
        &self.scan.routes
    }

    /// The neighbour entries the guest gets.
    pub fn neighbours(&self) -> &[GuestNeighbour] {
        &self.scan.neighbours
    }

    /// The namespace, as messages name it.
    pub fn netns_label(&self) -> &str {
        &self.label
    }

    pub fn is_empty(&self) -> bool {
        self.scan.interfaces.is_empty()
    }

    /// The agent requests: one UpdateInterface per interface, then the
    /// routes and the neighbours.
    pub fn agent_requests(
        &self,
    ) -> (
        Vec<agent::UpdateInterfaceRequest>,
        agent::UpdateRoutesRequest,
        agent::AddArpNeighborsRequest,
    ) {
        let interfaces = self
            .scan
            .interfaces
            .iter()
            .map(|i| agent::UpdateInterfaceRequest {
                interface: Some(agent::Interface {
                    name: i.name.clone(),
                    mac: format_mac(&i.mac),
                    mtu: i.mtu,
                    addresses: i.addresses.iter().map(ip_address).collect(),
                    noarp: i.noarp,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .collect();
        let routes = agent::UpdateRoutesRequest {
            routes: self
                .scan
                .routes
                .iter()
                .map(|r| agent::Route {
                    dest: r.dest.map(|d| d.to_string()).unwrap_or_default(),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: r.device.clone(),
                    source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                    scope: r.scope.into(),
                    family: family(r.ipv6).into(),
                    flags: r.flags,
                    mtu: r.mtu,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let neighbors = agent::AddArpNeighborsRequest {
            neighbors: self
                .scan
                .neighbours
                .iter()
                .map(|n| agent::ArpNeighbor {
                    ip: Some(ip_address(&IpCidr {
                        address: n.ip,
                        prefix_len: if n.ip.is_ipv4() { 32 } else { 128 },
                    }))
                    .into(),
                    device: n.device.clone(),
                    mac: format_mac(&n.mac),
                    state: n.state.into(),
                    flags: n.flags.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        (interfaces, routes, neighbors)
    }

    /// UpdateInterface per interface, then UpdateRoutes, then
    /// AddArpNeighbors, to the guest agent. Nothing for an empty network.
    pub fn configure_guest(&self, agent: &AgentServiceClient) -> anyhow::Result<()> {
        let (interfaces, routes, neighbors) = self.agent_requests();
        for request in &interfaces {
            let name = &request.interface.name;
            agent
                .update_interface(protocols::prompt_call(), request)
                .map_err(|e| anyhow::anyhow!(protocols::error_message(&e)))
                .with_context(|| {
                    format!(
                        "configuring the guest NIC {name} ({})",
                        request.interface.mac
                    )
                })?;
            tracing::debug!("guest NIC {name} configured");
        }
        if !routes.routes.is_empty() {
            agent
                .update_routes(protocols::prompt_call(), &routes)
                .map_err(|e| anyhow::anyhow!(protocols::error_message(&e)))
                .with_context(|| format!("adding {} routes in the guest", routes.routes.len()))?;
        }
        if !neighbors.neighbors.is_empty() {
            agent
                .add_arp_neighbors(protocols::prompt_call(), &neighbors)
                .map_err(|e| anyhow::anyhow!(protocols::error_message(&e)))
                .with_context(|| {
                    format!(
                        "adding {} neighbour entries in the guest",
                        neighbors.neighbors.len()
                    )
                })?;
        }
        Ok(())
    }

    /// Removes the ingress qdiscs (and so the filters) from the veths;
    /// tolerates a veth or namespace already gone; idempotent. Taps not
    /// taken are closed (and so vanish); taken ones vanish with the VMM.
    pub fn tear_down(&mut self) {
        self.attachments.clear();
        if !self.wired {
            return;
        }
        self.wired = false;
        let interfaces = self.scan.interfaces.clone();
        let result = netns::run_in(
            &self.netns,
            |ns| async move { unwire(&ns, &interfaces).await },
        );
        match result {
            Ok(()) => tracing::debug!("{}: unwired", self.label),
            Err(e) => tracing::warn!(
                "tearing the pod network down: {}",
                protocols::error_chain(&e)
            ),
        }
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.tear_down();
    }
}

fn family(ipv6: bool) -> agent::IpFamily {
    if ipv6 {
        agent::IpFamily::V6
    } else {
        agent::IpFamily::V4
    }
}

fn ip_address(cidr: &IpCidr) -> agent::IpAddress {
    agent::IpAddress {
        family: family(cidr.address.is_ipv6()).into(),
        address: cidr.address.to_string(),
        prefix_len: cidr.prefix_len.into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;

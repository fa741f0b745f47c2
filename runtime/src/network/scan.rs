//! What the pod's network namespace holds that the guest must copy: per
//! veth its name, MAC, MTU, addresses, routes and static neighbours (Kata's
//! `validGuestRoute` / `validGuestNeighbor` rules).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::netns::Ns;
use super::NetworkError;

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// A veth of the pod, as the guest NIC must look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    /// The veth's name ("eth0"): the guest NIC gets it.
    pub name: String,
    /// The veth's ifindex in the pod's namespace.
    pub index: u32,
    /// The veth's MAC: the guest NIC gets it, so the bridge keeps seeing
    /// the MAC CNI reported.
    pub mac: [u8; 6],
    pub mtu: u32,
    pub noarp: bool,
    /// Without link-local and loopback addresses.
    pub addresses: Vec<IpCidr>,
}

/// A route of the main table through a veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRoute {
    pub ipv6: bool,
    /// None for a default route.
    pub dest: Option<IpCidr>,
    /// None for an on-link route.
    pub gateway: Option<IpAddr>,
    /// The interface's name (GuestInterface::name).
    pub device: String,
    pub source: Option<IpAddr>,
    pub scope: u8,
    /// rtm_flags (RTNH_F_ONLINK = 4).
    pub flags: u32,
    /// RTAX_MTU, 0 for none.
    pub mtu: u32,
}

/// A neighbour entry the guest needs (static ones, and the reachable
/// default gateways').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNeighbour {
    pub ip: IpAddr,
    pub device: String,
    pub mac: [u8; 6],
    /// ndm_state (NUD_PERMANENT = 0x80).
    pub state: u16,
    /// ndm_flags.
    pub flags: u8,
}

/// Everything found in one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub interfaces: Vec<GuestInterface>,
    pub routes: Vec<GuestRoute>,
    pub neighbours: Vec<GuestNeighbour>,
}

/// "aa:bb:cc:dd:ee:ff".
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn is_veth(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    })
}

/// The guest interface for `link`, if it is a veth (never `lo`) with a MAC.
pub fn interface_of(link: &LinkMessage) -> Option<GuestInterface> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = None;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    let name = name?;
    if name == "lo" || link.header.flags.contains(LinkFlags::Loopback) || !is_veth(link) {
        return None;
    }
    let Some(mac) = mac else {
        tracing::warn!("veth {name} has no Ethernet address; skipped");
        return None;
    };
    Some(GuestInterface {
        name,
        index: link.header.index,
        mac,
        mtu: mtu.unwrap_or(1500),
        noarp: link.header.flags.contains(LinkFlags::Noarp),
        addresses: Vec::new(),
    })
}

fn is_link_local_or_loopback(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_loopback(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_loopback(),
    }
}

/// The address of `message` worth copying to the guest.
pub fn address_of(message: &AddressMessage) -> Option<IpCidr> {
    // IPv4 puts the local address in IFA_LOCAL (IFA_ADDRESS is the peer's
    // on point-to-point links); IPv6 has only IFA_ADDRESS.
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    if is_link_local_or_loopback(&address) {
        return None;
    }
    Some(IpCidr {
        address,
        prefix_len: message.header.prefix_len,
    })
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route of `message` worth copying to the guest: main table, through
/// one of `links` (ifindex → name), unicast, not a kernel-made one (those
/// come back by themselves when the guest gets the address).
pub fn route_of(message: &RouteMessage, links: &HashMap<u32, String>) -> Option<GuestRoute> {
    let header = &message.header;
    let table = message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || header.protocol == RouteProtocol::Kernel
        || header.kind != RouteType::Unicast
    {
        return None;
    }
    let ipv6 = match header.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    let mut route = GuestRoute {
        ipv6,
        dest: None,
        gateway: None,
        device: String::new(),
        source: None,
        scope: header.scope.into(),
        flags: header.flags.bits(),
        mtu: 0,
    };
    let mut oif = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Destination(a) => {
                route.dest = ip_of(a).map(|address| IpCidr {
                    address,
                    prefix_len: header.destination_prefix_length,
                })
            }
            RouteAttribute::Gateway(a) => route.gateway = ip_of(a),
            RouteAttribute::PrefSource(a) => route.source = ip_of(a),
            RouteAttribute::Metrics(metrics) => {
                for metric in metrics {
                    if let RouteMetric::Mtu(mtu) = metric {
                        route.mtu = *mtu;
                    }
                }
            }
            _ => {}
        }
    }
    route.device = links.get(&oif?)?.clone();
    if header.destination_prefix_length == 0 {
        route.dest = None;
    } else if route.dest.is_none() {
        return None;
    }
    if let Some(IpAddr::V6(v6)) = route.dest.map(|d| d.address) {
        // Multicast and link-local prefixes are the guest kernel's own.
        if v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80 {
            return None;
        }
    }
    Some(route)
}

/// The neighbour of `message` worth copying to the guest: on one of
/// `links`, with an Ethernet address, permanent, or reachable and one of
/// the default `gateways`.
pub fn neighbour_of(
    message: &NeighbourMessage,
    links: &HashMap<u32, String>,
    gateways: &[IpAddr],
) -> Option<GuestNeighbour> {
    let device = links.get(&message.header.ifindex)?.clone();
    let mut ip = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(lla) => {
                mac = <[u8; 6]>::try_from(lla.as_slice()).ok()
            }
            _ => {}
        }
    }
    let (ip, mac) = (ip?, mac?);
    let wanted = match message.header.state {
        NeighbourState::Permanent => true,
        NeighbourState::Reachable => gateways.contains(&ip),
        _ => false,
    };
    wanted.then(|| GuestNeighbour {
        ip,
        device,
        mac,
        state: message.header.state.into(),
        flags: message.header.flags.bits(),
    })
}

/// Reads the veths of the namespace `ns` is in, with their addresses,
/// routes and neighbours.
pub async fn scan(ns: &Ns) -> Result<Scan, NetworkError> {
    let links: Vec<LinkMessage> = ns
        .handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(ns.fail("", "listing links"))?;
    let mut interfaces: Vec<GuestInterface> = links.iter().filter_map(interface_of).collect();
    interfaces.sort_by_key(|i| i.index);
    let names: HashMap<u32, String> = interfaces
        .iter()
        .map(|i| (i.index, i.name.clone()))
        .collect();
    if interfaces.is_empty() {
        return Ok(Scan::default());
    }

    for interface in &mut interfaces {
        let addresses: Vec<AddressMessage> = ns
            .handle
            .address()
            .get()
            .set_link_index_filter(interface.index)
            .execute()
            .try_collect()
            .await
            .map_err(ns.fail(&interface.name, "listing addresses"))?;
        interface.addresses = addresses.iter().filter_map(address_of).collect();
    }

    let mut messages: Vec<RouteMessage> = ns
        .handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(ns.fail("", "listing IPv4 routes"))?;
    let v6: Vec<RouteMessage> = ns
        .handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(ns.fail("", "listing IPv6 routes"))?;
    messages.extend(v6);
    let mut routes: Vec<GuestRoute> = messages
        .iter()
        .filter_map(|m| route_of(m, &names))
        .collect();
    // On-link routes first: a gateway must be reachable when its route is added.
    routes.sort_by_key(|r| r.gateway.is_some());

    let gateways: Vec<IpAddr> = routes
        .iter()
        .filter(|r| r.dest.is_none())
        .filter_map(|r| r.gateway)
        .collect();
    let neighbours: Vec<NeighbourMessage> = ns
        .handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(ns.fail("", "listing neighbours"))?;
    let neighbours = neighbours
        .iter()
        .filter_map(|n| neighbour_of(n, &names, &gateways))
        .collect();
    Ok(Scan {
        interfaces,
        routes,
        neighbours,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::{RouteFlags, RouteScope};

    fn links() -> HashMap<u32, String> {
        HashMap::from([(2, "eth0".to_string())])
    }

    fn route(build: impl FnOnce(&mut RouteMessage)) -> RouteMessage {
        let mut message = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(2)
            .build();
        message.header.protocol = RouteProtocol::Boot;
        build(&mut message);
        message
    }

    #[test]
    fn main_table_routes_through_a_veth_are_kept() {
        let default = route(|m| {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                    10, 0, 0, 1,
                ))));
            m.header.flags = RouteFlags::Onlink;
        });
        assert_eq!(
            route_of(&default, &links()),
            Some(GuestRoute {
                ipv6: false,
                dest: None,
                gateway: Some("10.0.0.1".parse().unwrap()),
                device: "eth0".into(),
                source: None,
                scope: 0,
                flags: 4,
                mtu: 0,
            })
        );
        let subnet = route(|m| {
            m.header.destination_prefix_length = 16;
            m.header.scope = RouteScope::Link;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(
                    Ipv4Addr::new(10, 9, 0, 0),
                )));
            m.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]));
        });
        let kept = route_of(&subnet, &links()).unwrap();
        assert_eq!(kept.dest.unwrap().to_string(), "10.9.0.0/16");
        assert_eq!((kept.scope, kept.mtu, kept.gateway), (253, 1400, None));
    }

    #[test]
    fn kernel_other_table_and_other_link_routes_are_dropped() {
        let kernel = route(|m| m.header.protocol = RouteProtocol::Kernel);
        assert_eq!(route_of(&kernel, &links()), None);
        let local_table = route(|m| m.header.table = 255);
        assert_eq!(route_of(&local_table, &links()), None);
        let other_link = route(|m| {
            m.attributes
                .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
            m.attributes.push(RouteAttribute::Oif(7));
        });
        assert_eq!(route_of(&other_link, &links()), None);
        let broadcast = route(|m| m.header.kind = RouteType::Broadcast);
        assert_eq!(route_of(&broadcast, &links()), None);
    }

    fn neighbour(state: NeighbourState, ip: Ipv4Addr) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.ifindex = 2;
        message.header.state = state;
        message.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]),
        ];
        message
    }

    #[test]
    fn permanent_neighbours_and_reachable_gateways_are_kept() {
        let gateway: IpAddr = "10.0.0.1".parse().unwrap();
        let permanent = neighbour(NeighbourState::Permanent, Ipv4Addr::new(10, 0, 0, 7));
        let kept = neighbour_of(&permanent, &links(), &[gateway]).unwrap();
        assert_eq!((kept.state, kept.device.as_str()), (0x80, "eth0"));
        assert_eq!(format_mac(&kept.mac), "02:00:00:00:00:01");
        let reachable_gw = neighbour(NeighbourState::Reachable, Ipv4Addr::new(10, 0, 0, 1));
        assert!(neighbour_of(&reachable_gw, &links(), &[gateway]).is_some());
        let reachable_peer = neighbour(NeighbourState::Reachable, Ipv4Addr::new(10, 0, 0, 9));
        assert!(neighbour_of(&reachable_peer, &links(), &[gateway]).is_none());
        let stale = neighbour(NeighbourState::Stale, Ipv4Addr::new(10, 0, 0, 1));
        assert!(neighbour_of(&stale, &links(), &[gateway]).is_none());
    }

    #[test]
    fn link_local_addresses_are_skipped() {
        let mut message = AddressMessage::default();
        message.header.prefix_len = 64;
        message.attributes = vec![AddressAttribute::Address("fe80::1".parse().unwrap())];
        assert_eq!(address_of(&message), None);
        message.attributes = vec![
            AddressAttribute::Address("10.0.0.9".parse().unwrap()),
            AddressAttribute::Local("10.0.0.2".parse().unwrap()),
        ];
        message.header.prefix_len = 24;
        assert_eq!(address_of(&message).unwrap().to_string(), "10.0.0.2/24");
    }
}

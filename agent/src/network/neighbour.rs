//! AddArpNeighbors: static neighbour (ARP / NDP) entries.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use protocols::agent::ArpNeighbor;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::Handle;

use super::{
    dump_links, format_lladdr, index_of_link, invalid, ip_address, name_of, netlink,
    parse_ip_address, parse_lladdr, run, Result,
};

/// NUD_PERMANENT.
const PERMANENT: u16 = 0x80;

/// A validated [`ArpNeighbor`].
struct Plan {
    ip: IpAddr,
    lladdr: Vec<u8>,
    device: String,
    state: u16,
    flags: u8,
}

/// Adds (replaces) each entry, in the given order, on its device; state 0
/// means NUD_PERMANENT. All entries are checked (syntax, devices) before any
/// is applied; the first kernel refusal stops the call.
pub fn add_arp_neighbors(neighbors: &[ArpNeighbor]) -> Result<()> {
    let plans = neighbors
        .iter()
        .map(parse_neighbor)
        .collect::<Result<Vec<_>>>()?;
    run(|handle| async move {
        let links = dump_links(&handle).await?;
        let mut indexes = Vec::with_capacity(plans.len());
        for plan in &plans {
            let index = index_of_link(&links, &plan.device, format!("neighbour {}", plan.ip))?;
            indexes.push(index);
        }
        for (plan, &index) in plans.iter().zip(&indexes) {
            let what = format!(
                "neighbour {} lladdr {} dev {}",
                plan.ip,
                format_lladdr(&plan.lladdr),
                plan.device
            );
            handle
                .neighbours()
                .add(index, plan.ip)
                .link_layer_address(&plan.lladdr)
                .state(NeighbourState::from(plan.state))
                .flags(NeighbourFlags::from_bits_retain(plan.flags))
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("adding {what}")))?;
            tracing::debug!("added {what} (state {:#x})", plan.state);
        }
        Ok(())
    })
}

/// The IPv4 and IPv6 neighbour entries on `device` (every device when
/// empty) that have a link-layer address.
pub fn list_neighbors(device: &str) -> Result<Vec<ArpNeighbor>> {
    run(|handle| async move {
        let links = dump_links(&handle).await?;
        Ok(dump_neighbours(&handle)
            .await?
            .iter()
            .filter_map(|message| neighbor_of(message, &links))
            .filter(|neighbor| device.is_empty() || neighbor.device == device)
            .collect())
    })
}

fn parse_neighbor(neighbor: &ArpNeighbor) -> Result<Plan> {
    let ip = neighbor
        .ip
        .as_ref()
        .ok_or_else(|| invalid("neighbour without an IP address"))?;
    let name = || format!("neighbour {} dev {}", ip.address, neighbor.device);
    let (address, _) = parse_ip_address(ip).map_err(|e| invalid(format!("{}: {e}", name())))?;
    let lladdr = parse_lladdr(&neighbor.mac).map_err(|e| invalid(format!("{}: {e}", name())))?;
    if neighbor.device.is_empty() {
        return Err(invalid(format!("{}: no device given", name())));
    }
    let state = match u16::try_from(neighbor.state) {
        Ok(0) => PERMANENT,
        Ok(state) => state,
        Err(_) => return Err(invalid(format!("{}: bad state {}", name(), neighbor.state))),
    };
    let flags = u8::try_from(neighbor.flags)
        .map_err(|_| invalid(format!("{}: bad flags {}", name(), neighbor.flags)))?;
    Ok(Plan {
        ip: address,
        lladdr,
        device: neighbor.device.clone(),
        state,
        flags,
    })
}

async fn dump_neighbours(handle: &Handle) -> Result<Vec<NeighbourMessage>> {
    handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing neighbours"))
}

fn neighbor_of(
    message: &NeighbourMessage,
    links: &[rtnetlink::packet_route::link::LinkMessage],
) -> Option<ArpNeighbor> {
    let ip = message.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })?;
    let lladdr = message.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(lladdr) => Some(lladdr),
        _ => None,
    })?;
    Some(ArpNeighbor {
        ip: Some(ip_address(ip, if ip.is_ipv4() { 32 } else { 128 })).into(),
        device: name_of(links, message.header.ifindex),
        mac: format_lladdr(lladdr),
        state: u16::from(message.header.state).into(),
        flags: message.header.flags.bits().into(),
        ..Default::default()
    })
}

//! UpdateInterface: the guest NIC carrying the pod veth's MAC takes the
//! veth's name, MTU, ARP flag and addresses.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use protocols::agent::Interface;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

use super::{
    dump_links, format_lladdr, invalid, ip_address, is_ipv6_link_local, link_mac, link_name,
    netlink, parse_ip_address, parse_mac, run, Result,
};

/// Applies `wanted` to the link whose MAC is `wanted.mac`, in this order:
/// down (only when it must be renamed; a link already holding the name is
/// brought down and renamed `mvm-old<index>` first), rename, MTU (unless 0)
/// and ARP flag, addresses (every address not asked for is removed but
/// IPv6 link-local ones; the asked ones are added or replaced), up.
/// An empty `name` keeps the current name, an `mtu` of 0 the current MTU.
/// Everything is checked before the first change; a kernel refusal stops
/// the call where it is (earlier steps stay applied). Answers the interface
/// as read back afterwards (addresses without IPv6 link-local ones).
pub fn update_interface(wanted: &Interface) -> Result<Interface> {
    let mac = parse_mac(&wanted.mac)?;
    check_name(&wanted.name)?;
    let addresses = wanted
        .addresses
        .iter()
        .map(parse_ip_address)
        .collect::<Result<Vec<_>>>()?;
    run(|handle| async move {
        let links = dump_links(&handle).await?;
        let nic = links
            .iter()
            .find(|link| link_mac(link) == Some(&mac[..]))
            .ok_or_else(|| invalid(format!("no guest NIC has MAC {}", format_lladdr(&mac))))?;
        let index = nic.header.index;
        let current = link_name(nic).unwrap_or_default().to_string();
        let rename = !wanted.name.is_empty() && wanted.name != current;
        if rename {
            set_link(
                &handle,
                LinkUnspec::new_with_index(index).down().build(),
                || format!("bringing {current} down"),
            )
            .await?;
            if let Some(other) = links
                .iter()
                .find(|link| link.header.index != index && link_name(link) == Some(&wanted.name))
            {
                move_aside(&handle, other, &wanted.name).await?;
            }
        }
        let name = if rename { &wanted.name } else { &current };
        let mut change = LinkUnspec::new_with_index(index).arp(!wanted.noarp);
        if rename {
            change = change.name(wanted.name.clone());
        }
        if wanted.mtu != 0 {
            change = change.mtu(wanted.mtu);
        }
        set_link(&handle, change.build(), || {
            format!(
                "setting {current} (index {index}): name {name}, mtu {}, noarp {}",
                wanted.mtu, wanted.noarp
            )
        })
        .await?;
        tracing::debug!(
            "link {index} ({current}) is {name}: mtu {}, noarp {}",
            wanted.mtu,
            wanted.noarp
        );
        replace_addresses(&handle, index, name, &addresses).await?;
        set_link(
            &handle,
            LinkUnspec::new_with_index(index).up().build(),
            || format!("bringing {name} up"),
        )
        .await?;
        tracing::debug!("link {name} is up");
        interface_of(&handle, index).await
    })
}

/// The link named `name` as an [`Interface`] (addresses without IPv6
/// link-local ones).
pub fn read_interface(name: &str) -> Result<Interface> {
    run(|handle| async move {
        let index = super::link_index(&handle, name, "reading interface").await?;
        interface_of(&handle, index).await
    })
}

/// What `dev_valid_name` in the kernel accepts.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err(invalid(format!("bad interface name {name:?}")));
    }
    Ok(())
}

async fn set_link(
    handle: &Handle,
    message: LinkMessage,
    what: impl FnOnce() -> String,
) -> Result<()> {
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(netlink(what()))
}

/// Frees `name` for our NIC: `other` goes down and becomes `mvm-old<index>`.
async fn move_aside(handle: &Handle, other: &LinkMessage, name: &str) -> Result<()> {
    let index = other.header.index;
    let aside = format!("mvm-old{index}");
    set_link(
        handle,
        LinkUnspec::new_with_index(index).down().build(),
        || format!("bringing {name} (holding the wanted name) down"),
    )
    .await?;
    set_link(
        handle,
        LinkUnspec::new_with_index(index)
            .name(aside.clone())
            .build(),
        || format!("renaming {name} (holding the wanted name) to {aside}"),
    )
    .await?;
    tracing::debug!("renamed link {index} from {name} to {aside} to free its name");
    Ok(())
}

/// Removes the link's addresses that are not wanted (keeping IPv6
/// link-local ones), then adds or replaces each wanted one.
async fn replace_addresses(
    handle: &Handle,
    index: u32,
    name: &str,
    wanted: &[(IpAddr, u8)],
) -> Result<()> {
    for message in dump_addresses(handle, index).await? {
        let Some(address) = address_of(&message) else {
            continue;
        };
        let prefix = message.header.prefix_len;
        if is_ipv6_link_local(address) || wanted.contains(&(address, prefix)) {
            continue;
        }
        handle
            .address()
            .del(message)
            .execute()
            .await
            .map_err(netlink(format!("removing {address}/{prefix} from {name}")))?;
        tracing::debug!("removed {address}/{prefix} from {name}");
    }
    for &(address, prefix) in wanted {
        let mut request = handle.address().add(index, address, prefix).replace();
        if address.is_ipv6() {
            // The runtime hands over addresses CNI already claimed on this
            // segment (duplicate address detection ran in the pod's network
            // namespace): usable at once, as in a runc pod, not tentative
            // for another second or two.
            request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        request
            .execute()
            .await
            .map_err(netlink(format!("adding {address}/{prefix} to {name}")))?;
        tracing::debug!("added {address}/{prefix} to {name}");
    }
    Ok(())
}

async fn dump_addresses(handle: &Handle, index: u32) -> Result<Vec<AddressMessage>> {
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("listing the addresses of link {index}")))
}

/// IFA_LOCAL (the interface's own address on point-to-point links), else
/// IFA_ADDRESS.
fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(address) => Some(*address),
        _ => None,
    });
    local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(address) => Some(*address),
            _ => None,
        })
    })
}

async fn interface_of(handle: &Handle, index: u32) -> Result<Interface> {
    let links = dump_links(handle).await?;
    let link = links
        .iter()
        .find(|link| link.header.index == index)
        .ok_or_else(|| invalid(format!("link {index} vanished")))?;
    let mtu = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(0);
    let addresses = dump_addresses(handle, index)
        .await?
        .iter()
        .filter_map(|message| {
            let address = address_of(message)?;
            (!is_ipv6_link_local(address)).then(|| ip_address(address, message.header.prefix_len))
        })
        .collect();
    Ok(Interface {
        name: link_name(link).unwrap_or_default().to_string(),
        mac: link_mac(link).map(format_lladdr).unwrap_or_default(),
        mtu,
        addresses,
        noarp: link.header.flags.contains(LinkFlags::Noarp),
        ..Default::default()
    })
}

//! UpdateRoutes: the pod's routes, added (or replaced) in the main table.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use protocols::agent::{IpFamily, Route};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{
    dump_links, family_of, index_of_link, invalid, name_of, netlink, parse_cidr, parse_ip, run,
    Result,
};

/// rtm_scope of a link-scope route.
const SCOPE_LINK: u8 = 253;
/// RTNH_F_ONLINK: the only rtm_flags bit a new route may carry (the kernel
/// refuses e.g. RTNH_F_LINKDOWN, which a scanned host route may show).
const ONLINK: u32 = 4;

/// A validated [`Route`].
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    family: IpFamily,
    /// None: the default route.
    dest: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    device: String,
    scope: u8,
    flags: u32,
    mtu: u32,
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dest {
            Some((address, prefix)) => write!(f, "{address}/{prefix}")?,
            None => write!(f, "default ({:?})", self.family)?,
        }
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        write!(f, " dev {}", self.device)?;
        if let Some(source) = self.source {
            write!(f, " src {source}")?;
        }
        Ok(())
    }
}

/// Adds (replaces) each route on its device in the main table: first the
/// routes without a gateway (so that gateways become reachable), then those
/// with one, each group in the given order. All routes are checked (syntax,
/// families, devices) before any is applied; the first kernel refusal stops
/// the call (routes applied before it stay). An IPv4 route without gateway
/// and scope 0 gets link scope, as `ip route add` gives it; of the flags
/// only RTNH_F_ONLINK is applied; an empty dest (or a /0) is the default
/// route; an `mtu` of 0 sets no RTAX_MTU metric. Answers the
/// applied routes as read back from the kernel, in the order applied.
pub fn update_routes(routes: &[Route]) -> Result<Vec<Route>> {
    let mut plans = routes
        .iter()
        .map(|route| {
            parse_route(route).map_err(|e| invalid(format!("route {}: {e}", describe(route))))
        })
        .collect::<Result<Vec<_>>>()?;
    plans.sort_by_key(|plan| plan.gateway.is_some());
    run(|handle| async move {
        let links = dump_links(&handle).await?;
        let mut indexes = Vec::with_capacity(plans.len());
        for plan in &plans {
            let index = index_of_link(&links, &plan.device, format!("route {plan}"))?;
            indexes.push(index);
        }
        for (plan, &index) in plans.iter().zip(&indexes) {
            handle
                .route()
                .add(message(plan, index)?)
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("adding route {plan}")))?;
            tracing::debug!("added route {plan}");
        }
        let present = dump_routes(&handle).await?;
        let mut applied = Vec::with_capacity(plans.len());
        for (plan, &index) in plans.iter().zip(&indexes) {
            // Not found only if something removed it meanwhile: answer the request.
            applied.push(match present.iter().find(|m| same_route(m, plan, index)) {
                Some(found) => route_of(found, &links),
                None => route_of(&message(plan, index)?, &links),
            });
        }
        Ok(applied)
    })
}

/// The main table's unicast routes on `device` (every device when empty).
pub fn list_routes(device: &str) -> Result<Vec<Route>> {
    run(|handle| async move {
        let links = dump_links(&handle).await?;
        Ok(dump_routes(&handle)
            .await?
            .iter()
            .map(|message| route_of(message, &links))
            .filter(|route| device.is_empty() || route.device == device)
            .collect())
    })
}

/// "dest via gateway dev device" of a route not yet parsed.
fn describe(route: &Route) -> String {
    let mut text = if route.dest.is_empty() {
        "default".to_string()
    } else {
        route.dest.clone()
    };
    if !route.gateway.is_empty() {
        text += &format!(" via {}", route.gateway);
    }
    text + &format!(" dev {}", route.device)
}

fn parse_route(route: &Route) -> Result<Plan> {
    let family = route
        .family
        .enum_value()
        .map_err(|n| invalid(format!("unknown family {n}")))?;
    let dest = match route.dest.trim() {
        "" | "default" => None,
        dest => Some(parse_cidr(dest, "dest")?).filter(|(_, prefix)| *prefix != 0),
    };
    let optional = |text: &str, what: &str| -> Result<Option<IpAddr>> {
        match text.trim() {
            "" => Ok(None),
            text => parse_ip(text, what).map(Some),
        }
    };
    let gateway = optional(&route.gateway, "gateway")?;
    let source = optional(&route.source, "source")?;
    let addresses = [dest.map(|(address, _)| address), gateway, source];
    for address in addresses.into_iter().flatten() {
        if family_of(address) != family {
            return Err(invalid(format!("{address} is not of family {family:?}")));
        }
    }
    if route.device.is_empty() {
        return Err(invalid("no device given"));
    }
    if route.flags & !ONLINK != 0 {
        tracing::debug!(
            "route {}: ignoring flags {:#x} (only onlink is applied)",
            describe(route),
            route.flags & !ONLINK
        );
    }
    let mut scope =
        u8::try_from(route.scope).map_err(|_| invalid(format!("bad scope {}", route.scope)))?;
    if scope == 0 && gateway.is_none() && family == IpFamily::V4 {
        scope = SCOPE_LINK;
    }
    Ok(Plan {
        family,
        dest,
        gateway,
        source,
        device: route.device.clone(),
        scope,
        flags: route.flags & ONLINK,
        mtu: route.mtu,
    })
}

fn message(plan: &Plan, index: u32) -> Result<RouteMessage> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new();
    builder.get_mut().header.address_family = match plan.family {
        IpFamily::V4 => AddressFamily::Inet,
        IpFamily::V6 => AddressFamily::Inet6,
    };
    if let Some((address, prefix)) = plan.dest {
        builder = builder
            .destination_prefix(address, prefix)
            .map_err(|e| invalid(format!("route {plan}: {e}")))?;
    }
    if let Some(gateway) = plan.gateway {
        builder = builder
            .gateway(gateway)
            .map_err(|e| invalid(format!("route {plan}: {e}")))?;
    }
    if let Some(source) = plan.source {
        builder = builder
            .pref_source(source)
            .map_err(|e| invalid(format!("route {plan}: {e}")))?;
    }
    let mut message = builder
        .output_interface(index)
        .scope(RouteScope::from(plan.scope))
        .build();
    message.header.flags = RouteFlags::from_bits_retain(plan.flags);
    if plan.mtu != 0 {
        message
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(plan.mtu)]));
    }
    Ok(message)
}

async fn dump_routes(handle: &Handle) -> Result<Vec<RouteMessage>> {
    let mut routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing IPv4 routes"))?;
    let v6: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing IPv6 routes"))?;
    routes.extend(v6);
    routes.retain(|message| table_of(message) == u32::from(RouteHeader::RT_TABLE_MAIN));
    routes.retain(|message| message.header.kind == RouteType::Unicast);
    Ok(routes)
}

fn table_of(message: &RouteMessage) -> u32 {
    message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(message.header.table.into())
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn attribute_ip(
    message: &RouteMessage,
    pick: impl Fn(&RouteAttribute) -> Option<&RouteAddress>,
) -> Option<IpAddr> {
    message.attributes.iter().find_map(pick).and_then(ip_of)
}

fn destination(message: &RouteMessage) -> Option<(IpAddr, u8)> {
    let address = attribute_ip(message, |a| match a {
        RouteAttribute::Destination(address) => Some(address),
        _ => None,
    })?;
    Some((address, message.header.destination_prefix_length))
}

fn oif(message: &RouteMessage) -> Option<u32> {
    message.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

fn same_route(message: &RouteMessage, plan: &Plan, index: u32) -> bool {
    let family = match message.header.address_family {
        AddressFamily::Inet => IpFamily::V4,
        AddressFamily::Inet6 => IpFamily::V6,
        _ => return false,
    };
    // A default route has no destination attribute, or ::/0 / 0.0.0.0/0.
    let dest = destination(message).filter(|(_, prefix)| *prefix != 0);
    let wanted = plan.dest.filter(|(_, prefix)| *prefix != 0);
    family == plan.family && dest == wanted && oif(message) == Some(index)
}

fn route_of(message: &RouteMessage, links: &[rtnetlink::packet_route::link::LinkMessage]) -> Route {
    let family = match message.header.address_family {
        AddressFamily::Inet6 => IpFamily::V6,
        _ => IpFamily::V4,
    };
    let dest = match destination(message) {
        Some((address, prefix)) if prefix != 0 => format!("{address}/{prefix}"),
        _ => String::new(),
    };
    let gateway = attribute_ip(message, |a| match a {
        RouteAttribute::Gateway(address) => Some(address),
        _ => None,
    });
    let source = attribute_ip(message, |a| match a {
        RouteAttribute::PrefSource(address) => Some(address),
        _ => None,
    });
    let mtu = message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Metrics(metrics) => metrics.iter().find_map(|m| match m {
                RouteMetric::Mtu(mtu) => Some(*mtu),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or(0);
    Route {
        dest,
        gateway: gateway.map(|a| a.to_string()).unwrap_or_default(),
        device: oif(message).map(|i| name_of(links, i)).unwrap_or_default(),
        source: source.map(|a| a.to_string()).unwrap_or_default(),
        scope: u8::from(message.header.scope).into(),
        family: family.into(),
        flags: message.header.flags.bits(),
        mtu,
        ..Default::default()
    }
}

/// (dest or "default", has a gateway, scope) of a route, for the ordering test.
#[cfg(test)]
pub(super) fn tests_plan(route: &Route) -> (String, bool, u8) {
    let plan = parse_route(route).expect("a valid route");
    let dest = plan
        .dest
        .map_or_else(|| "default".to_string(), |(a, p)| format!("{a}/{p}"));
    (dest, plan.gateway.is_some(), plan.scope)
}

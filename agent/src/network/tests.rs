//! Parsing tests, and the three operations on TAP "NICs" in a throwaway
//! network namespace (root and /dev/net/tun needed; skipped otherwise).

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use protocols::agent::{ArpNeighbor, Interface, IpAddress, IpFamily, Route};
use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::LinkUnspec;

use super::*;

fn ip(address: &str, prefix: u32) -> IpAddress {
    IpAddress {
        family: if address.contains(':') {
            IpFamily::V6
        } else {
            IpFamily::V4
        }
        .into(),
        address: address.into(),
        prefix_len: prefix,
        ..Default::default()
    }
}

fn route(dest: &str, gateway: &str, device: &str) -> Route {
    let v6 = dest.contains(':') || gateway.contains(':');
    Route {
        dest: dest.into(),
        gateway: gateway.into(),
        device: device.into(),
        family: if v6 { IpFamily::V6 } else { IpFamily::V4 }.into(),
        ..Default::default()
    }
}

fn neighbor(address: &str, mac: &str, device: &str) -> ArpNeighbor {
    ArpNeighbor {
        ip: Some(ip(address, 0)).into(),
        mac: mac.into(),
        device: device.into(),
        ..Default::default()
    }
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T>, needle: &str) {
    match result {
        Err(NetworkError::InvalidArgument(message)) => assert!(
            message.contains(needle),
            "{message:?} does not mention {needle:?}"
        ),
        other => panic!("expected InvalidArgument mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn parses_macs_prefixes_and_names() {
    assert_eq!(
        parse_mac("02:00:00:AA:bb:0c").unwrap(),
        [2, 0, 0, 0xaa, 0xbb, 0x0c]
    );
    assert_invalid(parse_mac("02:00:00:aa:bb"), "not six octets");
    assert_invalid(parse_mac("zz:00:00:aa:bb:cc"), "bad link-layer address");
    assert_invalid(parse_mac("02:00:00:aa:bb:ccc"), "bad link-layer address");
    assert_invalid(parse_mac(""), "bad link-layer address");
    assert_eq!(format_lladdr(&[2, 0, 0xab]), "02:00:ab");

    let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        parse_cidr("10.0.0.0/8", "dest").unwrap(),
        (v4("10.0.0.0"), 8)
    );
    assert_eq!(
        parse_cidr("10.1.2.3", "dest").unwrap(),
        (v4("10.1.2.3"), 32)
    );
    assert_eq!(parse_cidr("fd00::/64", "dest").unwrap(), (v4("fd00::"), 64));
    assert_eq!(parse_cidr("0.0.0.0/0", "dest").unwrap(), (v4("0.0.0.0"), 0));
    assert_invalid(parse_cidr("10.0.0.1/8", "dest"), "host bits set");
    assert_invalid(parse_cidr("10.0.0.0/33", "dest"), "bad prefix length");
    assert_invalid(parse_cidr("10.0.0/8", "dest"), "bad dest");
    assert_eq!(mask(v4("fd00::ffff"), 112), v4("fd00::"));

    assert_eq!(
        parse_ip_address(&ip("fd00::5", 64)).unwrap(),
        (v4("fd00::5"), 64)
    );
    assert_invalid(parse_ip_address(&ip("10.0.0.300", 24)), "bad address");
    assert_invalid(parse_ip_address(&ip("10.0.0.3", 40)), "out of range");
    let mut wrong_family = ip("fd00::5", 64);
    wrong_family.family = IpFamily::V4.into();
    assert_invalid(parse_ip_address(&wrong_family), "not of family V4");

    assert!(is_ipv6_link_local(v4("fe80::1")));
    assert!(is_ipv6_link_local(v4("febf::1")));
    assert!(!is_ipv6_link_local(v4("fec0::1")));
    assert!(!is_ipv6_link_local(v4("10.0.0.1")));
}

#[test]
fn invalid_requests_fail_before_netlink() {
    // None of these reach the kernel, so they need no privilege.
    let mut interface = Interface {
        name: "eth0".into(),
        mac: "02:00:00:00:00".into(),
        ..Default::default()
    };
    assert_invalid(update_interface(&interface), "bad MAC");
    interface.mac = "02:00:00:00:00:01".into();
    interface.name = "a/b".into();
    assert_invalid(update_interface(&interface), "bad interface name");
    interface.name = "eth0".into();
    interface.addresses = vec![ip("10.250.0.x", 24)];
    assert_invalid(update_interface(&interface), "bad address \"10.250.0.x\"");

    assert_invalid(
        update_routes(&[route("10.0.0.0/8", "10.250.0.1", "")]),
        "no device given",
    );
    assert_invalid(
        update_routes(&[route("10.0.0.0/8", "bogus", "eth0")]),
        "bad gateway \"bogus\"",
    );
    let mut mixed = route("fd01::/64", "", "eth0");
    mixed.family = IpFamily::V4.into();
    assert_invalid(update_routes(&[mixed]), "not of family V4");
    let mut scope = route("10.0.0.0/8", "", "eth0");
    scope.scope = 300;
    assert_invalid(update_routes(&[scope]), "bad scope 300");

    assert_invalid(
        add_arp_neighbors(&[neighbor("10.0.0.1", "nope", "eth0")]),
        "bad link-layer address",
    );
    let mut no_ip = neighbor("10.0.0.1", "02:00:00:00:00:01", "eth0");
    no_ip.ip = None.into();
    assert_invalid(add_arp_neighbors(&[no_ip]), "without an IP address");
}

#[test]
fn gateway_less_routes_come_first_and_ipv4_ones_default_to_link_scope() {
    let routes = [
        route("", "10.250.0.1", "eth0"),
        route("10.250.1.0/24", "", "eth0"),
        route("fd01::/64", "fd00::1", "eth0"),
        route("fd02::/64", "", "eth0"),
    ];
    let mut plans: Vec<_> = routes.iter().map(route::tests_plan).collect();
    plans.sort_by_key(|(_, has_gateway, _)| *has_gateway);
    let order: Vec<_> = plans.iter().map(|(dest, _, _)| dest.as_str()).collect();
    assert_eq!(
        order,
        ["10.250.1.0/24", "fd02::/64", "default", "fd01::/64"]
    );
    assert_eq!(plans[0].2, 253, "IPv4 gateway-less route: link scope");
    assert_eq!(plans[1].2, 0, "IPv6 scope stays");
    assert_eq!(plans[2].2, 0, "route via a gateway: universe");
}

// --- in a network namespace -------------------------------------------------

/// Runs `body` on a thread of its own in a new network namespace (netlink
/// and tun sockets belong to the namespace of the thread that opens them).
/// Prints why and returns when that is not possible; a panic in `body`
/// fails the test.
fn in_netns(test: &str, body: impl FnOnce() + Send + 'static) {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping {test}: not root");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping {test}: no /dev/net/tun");
        return;
    }
    let thread = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        body();
        Ok::<(), String>(())
    });
    match thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => eprintln!("skipping {test}: {reason}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A TAP link named `name` with MAC `mac`; it lives as long as the fd.
fn tap(name: &str, mac: [u8; 6]) -> OwnedFd {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("opening /dev/net/tun");
    let fd = OwnedFd::from(file);
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes `request`, a valid ifreq that
    // outlives the call; fd is an open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    run(|handle| async move {
        handle
            .link()
            .set(
                LinkUnspec::new_with_name(name)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("setting the MAC of {name}")))
    })
    .unwrap();
    fd
}

fn is_up(name: &str) -> bool {
    run(|handle| async move {
        let links = dump_links(&handle).await?;
        Ok(links
            .iter()
            .find(|link| link_name(link) == Some(name))
            .is_some_and(|link| link.header.flags.contains(LinkFlags::Up)))
    })
    .unwrap()
}

fn add_address(device: &str, address: &str, prefix: u8) {
    let address: IpAddr = address.parse().unwrap();
    run(|handle| async move {
        let index = link_index(&handle, device, "test").await?;
        handle
            .address()
            .add(index, address, prefix)
            .execute()
            .await
            .map_err(netlink("adding a test address"))
    })
    .unwrap();
}

fn addresses(interface: &Interface) -> Vec<String> {
    let mut list: Vec<_> = interface
        .addresses
        .iter()
        .map(|a| format!("{}/{}", a.address, a.prefix_len))
        .collect();
    list.sort();
    list
}

const NIC_MAC: [u8; 6] = [0x02, 0, 0, 0xaa, 0xbb, 0x01];
const SQUATTER_MAC: [u8; 6] = [0x02, 0, 0, 0xaa, 0xbb, 0x02];

#[test]
fn update_interface_renames_by_mac_and_replaces_addresses() {
    in_netns(
        "update_interface_renames_by_mac_and_replaces_addresses",
        || {
            let _nic = tap("mvnic0", NIC_MAC);
            // Already holds the wanted name: must be moved aside, not hit.
            let _squatter = tap("eth0", SQUATTER_MAC);
            add_address("mvnic0", "192.0.2.9", 24);

            let wanted = Interface {
                name: "eth0".into(),
                mac: "02:00:00:AA:BB:01".into(),
                mtu: 1400,
                addresses: vec![ip("10.250.0.5", 24), ip("fd00::5", 64)],
                noarp: false,
                ..Default::default()
            };
            let applied = update_interface(&wanted).unwrap();
            assert_eq!(applied.name, "eth0");
            assert_eq!(applied.mac, "02:00:00:aa:bb:01");
            assert_eq!(applied.mtu, 1400);
            assert!(!applied.noarp);
            assert_eq!(addresses(&applied), ["10.250.0.5/24", "fd00::5/64"]);
            assert!(is_up("eth0"), "eth0 is not up");
            assert_eq!(read_interface("eth0").unwrap(), applied);
            // IPv6 addresses come without duplicate address detection (CNI
            // did it): not tentative, even on this tap without a carrier.
            let shown = std::process::Command::new("ip")
                .args(["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"])
                .output()
                .expect("running ip");
            let shown = String::from_utf8_lossy(&shown.stdout);
            assert!(
                shown.contains("fd00::5/64") && !shown.contains("tentative"),
                "{shown}"
            );

            // The former eth0 was renamed away and left down.
            let links = run(|handle| async move { dump_links(&handle).await }).unwrap();
            let squatter = links
                .iter()
                .find(|link| link_mac(link) == Some(&SQUATTER_MAC[..]))
                .expect("the squatter vanished");
            let aside = format!("mvm-old{}", squatter.header.index);
            assert_eq!(link_name(squatter), Some(aside.as_str()));
            assert!(!is_up(&aside));

            // Again, with other settings: nothing to rename, addresses swapped.
            let again = Interface {
                mtu: 1300,
                noarp: true,
                addresses: vec![ip("10.250.0.6", 24)],
                ..wanted.clone()
            };
            let applied = update_interface(&again).unwrap();
            assert_eq!((applied.mtu, applied.noarp), (1300, true));
            assert_eq!(addresses(&applied), ["10.250.0.6/24"]);
            assert!(is_up("eth0"));

            // Unknown MAC: named in the error, nothing touched.
            let unknown = Interface {
                mac: "02:00:00:ff:ff:ff".into(),
                ..wanted
            };
            assert_invalid(
                update_interface(&unknown),
                "no guest NIC has MAC 02:00:00:ff:ff:ff",
            );
            assert_eq!(read_interface("eth0").unwrap(), applied);
        },
    );
}

#[test]
fn update_routes_and_neighbours_on_a_tap() {
    in_netns("update_routes_and_neighbours_on_a_tap", || {
        let _nic = tap("mvnic1", NIC_MAC);
        update_interface(&Interface {
            name: "eth0".into(),
            mac: "02:00:00:aa:bb:01".into(),
            mtu: 1400,
            addresses: vec![ip("10.250.0.5", 24), ip("fd00::5", 64)],
            ..Default::default()
        })
        .unwrap();

        // 10.99.0.0/16's gateway is reachable only through 10.250.1.0/24,
        // listed after it: gateway-less routes must go first.
        let mut onlink = route("192.168.50.0/24", "10.250.9.9", "eth0");
        // RTNH_F_LINKDOWN (16), as a scanned host route may show, is dropped.
        onlink.flags = 4 | 16;
        onlink.mtu = 1300;
        let mut sourced = route("10.251.0.0/24", "", "eth0");
        sourced.source = "10.250.0.5".into();
        let mut connected = route("10.250.1.0/24", "", "eth0");
        connected.scope = 253;
        let requested = [
            route("10.99.0.0/16", "10.250.1.1", "eth0"),
            route("", "10.250.0.1", "eth0"),
            onlink,
            connected,
            sourced,
            route("fd01::/64", "fd00::1", "eth0"),
        ];
        let applied = update_routes(&requested).unwrap();
        let summary: Vec<_> = applied
            .iter()
            .map(|r| format!("{} via {} dev {}", r.dest, r.gateway, r.device))
            .collect();
        assert_eq!(
            summary,
            [
                "10.250.1.0/24 via  dev eth0",
                "10.251.0.0/24 via  dev eth0",
                "10.99.0.0/16 via 10.250.1.1 dev eth0",
                " via 10.250.0.1 dev eth0",
                "192.168.50.0/24 via 10.250.9.9 dev eth0",
                "fd01::/64 via fd00::1 dev eth0",
            ]
        );
        assert_eq!(applied[0].scope, 253);
        assert_eq!(applied[1].source, "10.250.0.5");
        assert_eq!(applied[1].scope, 253, "gateway-less IPv4 route: link scope");
        assert_eq!(applied[4].flags & 4, 4, "onlink flag");
        assert_eq!(applied[4].mtu, 1300);
        assert_eq!(applied[5].family.enum_value(), Ok(IpFamily::V6));

        let present = list_routes("eth0").unwrap();
        for route in &applied {
            assert!(present.contains(route), "{route:?} not in {present:?}");
        }
        assert!(present
            .iter()
            .any(|r| r.dest.is_empty() && r.gateway == "10.250.0.1"));
        // Replacing is idempotent.
        assert_eq!(update_routes(&requested).unwrap(), applied);

        // All-or-nothing validation: nothing applied when a device is unknown.
        let bad = [
            route("10.77.0.0/16", "", "eth0"),
            route("10.78.0.0/16", "", "nosuch0"),
        ];
        assert_invalid(update_routes(&bad), "no guest link named \"nosuch0\"");
        assert!(!list_routes("")
            .unwrap()
            .iter()
            .any(|r| r.dest == "10.77.0.0/16"));

        // The kernel refuses an unreachable gateway: errno kept.
        let error = update_routes(&[route("10.66.0.0/16", "172.31.0.1", "eth0")]).unwrap_err();
        assert!(
            matches!(error, NetworkError::Netlink { .. }),
            "unexpected {error:?}"
        );
        assert_eq!(error.errno(), Some(libc::ENETUNREACH), "{error}");
        assert!(error
            .to_string()
            .contains("adding route 10.66.0.0/16 via 172.31.0.1 dev eth0"));

        // Neighbours.
        let mut reachable = neighbor("fd00::1", "02:00:00:00:00:11", "eth0");
        reachable.state = 0x02;
        add_arp_neighbors(&[
            neighbor("10.250.0.1", "02:00:00:00:00:AA", "eth0"),
            reachable,
        ])
        .unwrap();
        let neighbors = list_neighbors("eth0").unwrap();
        let find = |address: &str| {
            neighbors
                .iter()
                .find(|n| n.ip.address == address)
                .unwrap_or_else(|| panic!("no neighbour {address} in {neighbors:?}"))
        };
        assert_eq!(find("10.250.0.1").mac, "02:00:00:00:00:aa");
        assert_eq!(find("10.250.0.1").state, 0x80, "default state: permanent");
        assert_eq!(find("fd00::1").mac, "02:00:00:00:00:11");
        assert_eq!(find("fd00::1").ip.family.enum_value(), Ok(IpFamily::V6));
        // Replace, not add: a second call with a new MAC wins.
        add_arp_neighbors(&[neighbor("10.250.0.1", "02:00:00:00:00:bb", "eth0")]).unwrap();
        let neighbors = list_neighbors("eth0").unwrap();
        assert!(neighbors
            .iter()
            .any(|n| n.ip.address == "10.250.0.1" && n.mac == "02:00:00:00:00:bb"));
        assert_invalid(
            add_arp_neighbors(&[neighbor("10.250.0.2", "02:00:00:00:00:01", "nosuch0")]),
            "no guest link named \"nosuch0\"",
        );
    });
}

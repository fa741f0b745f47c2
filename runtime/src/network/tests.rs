//! The wiring against the real kernel: root only, and veth needed (a PVM
//! host lacks it; the KVM test host has it). Each test makes its own
//! anonymous network namespaces, so nothing outlives it.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::tc::{
    TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterU32Option,
    TcMirrorActionType, TcOption,
};
use rtnetlink::LinkVeth;

use super::*;

const NEIGHBOUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];

/// Why the kernel tests cannot run here, if they cannot.
fn unsupported() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

/// The pod's namespace (eth0: a veth, MTU 1400, 10.9.0.2/24, default via
/// 10.9.0.1, a permanent neighbour 10.9.0.7) and the peer's (peer0,
/// 10.9.0.1/24). None (with the reason printed) where veth is missing.
struct TestNet {
    pod: File,
    peer: File,
}

fn test_net(test: &str) -> Option<TestNet> {
    if let Some(reason) = unsupported() {
        eprintln!("{test}: skipped: {reason}");
        return None;
    }
    let pod = netns::create_anonymous().expect("a network namespace");
    let peer = netns::create_anonymous().expect("a network namespace");
    let peer_fd = peer.as_raw_fd();
    let made = netns::run_in(&pod, |ns| async move {
        if let Err(e) = ns
            .handle
            .link()
            .add(LinkVeth::new("eth0", "peer0").build())
            .execute()
            .await
        {
            if tcfilter::errno(&e) == Some(libc::EOPNOTSUPP) {
                return Ok(false);
            }
            return Err(ns.fail("eth0", "creating the veth pair")(e));
        }
        let peer_index = link_index(&ns, "peer0").await?;
        ns.handle
            .link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .setns_by_fd(peer_fd)
                    .build(),
            )
            .execute()
            .await
            .map_err(ns.fail("peer0", "moving"))?;
        let index = link_index(&ns, "eth0").await?;
        ns.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(1400).up().build())
            .execute()
            .await
            .map_err(ns.fail("eth0", "up"))?;
        ns.handle
            .address()
            .add(index, IpAddr::V4(Ipv4Addr::new(10, 9, 0, 2)), 24)
            .execute()
            .await
            .map_err(ns.fail("eth0", "address"))?;
        ns.handle
            .route()
            .add(
                rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(Ipv4Addr::new(10, 9, 0, 1))
                    .output_interface(index)
                    .build(),
            )
            .execute()
            .await
            .map_err(ns.fail("eth0", "default route"))?;
        ns.handle
            .neighbours()
            .add(index, IpAddr::V4(Ipv4Addr::new(10, 9, 0, 7)))
            .link_layer_address(&NEIGHBOUR_MAC)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .map_err(ns.fail("eth0", "neighbour"))?;
        Ok(true)
    })
    .expect("setting up the pod namespace");
    if !made {
        eprintln!("{test}: skipped: this kernel has no veth");
        return None;
    }
    netns::run_in(&peer, |ns| async move {
        let index = link_index(&ns, "peer0").await?;
        ns.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(1400).up().build())
            .execute()
            .await
            .map_err(ns.fail("peer0", "up"))?;
        ns.handle
            .address()
            .add(index, IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1)), 24)
            .execute()
            .await
            .map_err(ns.fail("peer0", "address"))
    })
    .expect("setting up the peer namespace");
    Some(TestNet { pod, peer })
}

fn clone(file: &File) -> File {
    file.try_clone().expect("dup")
}

/// What the kernel shows of one link: (flags, MTU, MAC, has an ingress
/// qdisc, redirect targets of its ingress filters as (protocol, ifindex)).
#[derive(Debug)]
struct LinkState {
    index: u32,
    flags: LinkFlags,
    mtu: u32,
    mac: Vec<u8>,
    ingress: bool,
    redirects: Vec<(u16, u32)>,
}

/// The link's state, None when there is no such link.
fn link_state(netns: &File, name: &str) -> Option<LinkState> {
    let name = name.to_string();
    netns::run_in(netns, |ns| async move {
        let links: Vec<LinkMessage> = match ns
            .handle
            .link()
            .get()
            .match_name(name.clone())
            .execute()
            .try_collect()
            .await
        {
            Ok(links) => links,
            Err(e) if tcfilter::errno(&e) == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(ns.fail(&name, "get")(e)),
        };
        let Some(link) = links.first() else {
            return Ok(None);
        };
        let index = link.header.index;
        let mut state = LinkState {
            index,
            flags: link.header.flags,
            mtu: 0,
            mac: Vec::new(),
            ingress: false,
            redirects: Vec::new(),
        };
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::Mtu(mtu) => state.mtu = *mtu,
                LinkAttribute::Address(mac) => state.mac = mac.clone(),
                _ => {}
            }
        }
        let qdiscs = tcfilter::qdiscs(&ns, index, &name).await?;
        state.ingress = qdiscs.iter().any(tcfilter::is_ingress);
        if state.ingress {
            for filter in tcfilter::ingress_filters(&ns, index, &name).await? {
                let protocol = (filter.header.info & 0xffff) as u16;
                for attribute in &filter.attributes {
                    let TcAttribute::Options(options) = attribute else {
                        continue;
                    };
                    for option in options {
                        let TcOption::U32(TcFilterU32Option::Action(actions)) = option else {
                            continue;
                        };
                        for action in actions {
                            for a in &action.attributes {
                                let TcActionAttribute::Options(opts) = a else {
                                    continue;
                                };
                                for o in opts {
                                    if let TcActionOption::Mirror(TcActionMirrorOption::Parms(
                                        mirror,
                                    )) = o
                                    {
                                        if mirror.eaction == TcMirrorActionType::EgressRedir {
                                            state.redirects.push((protocol, mirror.ifindex));
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(Some(state))
    })
    .expect("reading a link's state")
}

/// An AF_PACKET socket bound to `link` of `netns`.
fn packet_socket(netns: &File, link: &str) -> OwnedFd {
    let link = link.to_string();
    netns::run_in(netns, |ns| async move {
        let index = link_index(&ns, &link).await?;
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(protocol),
            )
        };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroes are valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = index as i32;
        // SAFETY: bind reads one sockaddr_ll of the given size, ours.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        Ok(fd)
    })
    .expect("a packet socket")
}

/// A broadcast frame of the local experimental ethertype with `marker`.
fn frame(source: &[u8], marker: &[u8]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(source);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(marker);
    frame.resize(60, 0);
    frame
}

/// Reads from non-blocking `fd` until a read holds `marker` (5 s at most).
fn receive(fd: &OwnedFd, marker: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        // SAFETY: read(2) into our buffer, of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 && buf[..n as usize].windows(marker.len()).any(|w| w == marker) {
            return true;
        }
        if n <= 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    false
}

fn write_all(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: write(2) from our buffer, of its length.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    assert_eq!(
        n,
        data.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn wiring_joins_veth_and_tap_and_tear_down_undoes_it() {
    let Some(net) = test_net("wiring_joins_veth_and_tap_and_tear_down_undoes_it") else {
        return;
    };
    let mut pod = PodNetwork::wire(clone(&net.pod)).expect("wiring");
    assert!(!pod.is_empty());

    // What the guest is told.
    let eth0 = link_state(&net.pod, "eth0").expect("eth0");
    let interfaces = pod.interfaces().to_vec();
    assert_eq!(interfaces.len(), 1, "{interfaces:?}");
    assert_eq!(interfaces[0].name, "eth0");
    assert_eq!(interfaces[0].mac.to_vec(), eth0.mac);
    assert_eq!(interfaces[0].mtu, 1400);
    assert_eq!(
        interfaces[0]
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        ["10.9.0.2/24"]
    );
    assert_eq!(
        pod.routes()
            .iter()
            .map(|r| (r.dest, r.gateway, r.device.as_str()))
            .collect::<Vec<_>>(),
        [(None, Some("10.9.0.1".parse().unwrap()), "eth0")],
        "only the default route: the connected one is the kernel's"
    );
    assert!(pod
        .neighbours()
        .iter()
        .any(|n| n.ip == "10.9.0.7".parse::<IpAddr>().unwrap() && n.mac == NEIGHBOUR_MAC));
    let (requests, routes, neighbours) = pod.agent_requests();
    assert_eq!(requests[0].interface.mac, format_mac(&interfaces[0].mac));
    assert_eq!(requests[0].interface.addresses[0].address, "10.9.0.2");
    assert_eq!(routes.routes[0].gateway, "10.9.0.1");
    assert_eq!(routes.routes[0].dest, "");
    assert_eq!(neighbours.neighbors[0].mac, "02:00:00:00:00:07");

    // The kernel's side: tap up with the veth's MTU, ingress qdiscs and
    // redirects both ways, protocol all in network order.
    let attachments = pod.take_attachments();
    assert!(pod.take_attachments().is_empty(), "taken once");
    assert_eq!(attachments.len(), 1);
    assert_eq!(attachments[0].mac.to_vec(), eth0.mac);
    assert_eq!(attachments[0].mtu, 1400);
    let tap = link_state(&net.pod, "tap0_mvm").expect("the tap exists");
    assert!(tap.flags.contains(LinkFlags::Up), "{tap:?}");
    assert_eq!(tap.mtu, 1400);
    assert!(tap.ingress && eth0.ingress, "{tap:?} {eth0:?}");
    assert_eq!(eth0.redirects, [(tcfilter::PROTOCOL_ALL, tap.index)]);
    assert_eq!(tap.redirects, [(tcfilter::PROTOCOL_ALL, eth0.index)]);

    // Frames cross both ways: the tap fd (what the VMM holds, 10-byte
    // virtio-net header by default) and the veth's peer.
    let peer = packet_socket(&net.peer, "peer0");
    let mut from_guest = vec![0u8; 10];
    from_guest.extend(frame(&interfaces[0].mac, b"from-the-guest"));
    write_all(&attachments[0].tap, &from_guest);
    assert!(receive(&peer, b"from-the-guest"), "tap -> veth");
    let peer_mac = link_state(&net.peer, "peer0").expect("peer0").mac;
    write_all(&peer, &frame(&peer_mac, b"to-the-guest"));
    assert!(receive(&attachments[0].tap, b"to-the-guest"), "veth -> tap");

    pod.tear_down();
    let eth0 = link_state(&net.pod, "eth0").expect("eth0");
    assert!(!eth0.ingress, "{eth0:?}");
    assert!(eth0.redirects.is_empty());
    pod.tear_down(); // idempotent
    assert!(
        link_state(&net.pod, "tap0_mvm").is_some(),
        "the tap lives while its fd is open"
    );
    drop(attachments);
    let deadline = Instant::now() + Duration::from_secs(5);
    while link_state(&net.pod, "tap0_mvm").is_some() {
        assert!(Instant::now() < deadline, "the tap outlived its fd");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tear_down_tolerates_a_deleted_veth() {
    let Some(net) = test_net("tear_down_tolerates_a_deleted_veth") else {
        return;
    };
    let mut pod = PodNetwork::wire(clone(&net.pod)).expect("wiring");
    netns::run_in(&net.pod, |ns| async move {
        let index = link_index(&ns, "eth0").await?;
        ns.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(ns.fail("eth0", "deleting"))
    })
    .expect("CNI DEL's part");
    pod.tear_down();
    pod.tear_down();
    drop(pod);
}

#[test]
fn a_namespace_without_veth_wires_to_nothing() {
    if let Some(reason) = unsupported() {
        eprintln!("a_namespace_without_veth_wires_to_nothing: skipped: {reason}");
        return;
    }
    let netns = netns::create_anonymous().expect("a network namespace");
    let mut pod = PodNetwork::wire(clone(&netns)).expect("wiring");
    assert!(pod.is_empty());
    assert!(pod.take_attachments().is_empty());
    let (interfaces, routes, neighbours) = pod.agent_requests();
    assert!(interfaces.is_empty() && routes.routes.is_empty() && neighbours.neighbors.is_empty());
    assert!(link_state(&netns, "tap0_mvm").is_none());
    pod.tear_down();
}

#[test]
fn a_second_wiring_replaces_a_stale_ingress_qdisc() {
    let Some(net) = test_net("a_second_wiring_replaces_a_stale_ingress_qdisc") else {
        return;
    };
    // A crashed runtime's leftovers: its wiring never torn down.
    let mut first = PodNetwork::wire(clone(&net.pod)).expect("first wiring");
    drop(first.take_attachments());
    std::mem::forget(first);
    let mut second = PodNetwork::wire(clone(&net.pod)).expect("second wiring");
    let tap = link_state(&net.pod, "tap0_mvm").expect("the new tap");
    let eth0 = link_state(&net.pod, "eth0").expect("eth0");
    assert_eq!(eth0.redirects, [(tcfilter::PROTOCOL_ALL, tap.index)]);
    second.tear_down();
}

#[test]
fn the_vmm_argument_names_fd_mac_and_mtu() {
    let attachment = NetAttachment {
        tap: File::open("/dev/null").expect("/dev/null").into(),
        mac: [0xaa, 0xbb, 0xcc, 0x0d, 0x0e, 0x0f],
        mtu: 1400,
    };
    assert_eq!(
        attachment.vmm_nic(7).to_string(),
        "fd=7,mac=aa:bb:cc:0d:0e:0f,mtu=1400"
    );
    let mut devices = NetDevices::from(vec![attachment]);
    assert_eq!(devices.len(), 1);
    assert_eq!(devices.take().len(), 1);
    assert!(devices.is_empty() && devices.take().is_empty());
    devices.push(NetAttachment {
        tap: File::open("/dev/null").expect("/dev/null").into(),
        mac: [0; 6],
        mtu: 1500,
    });
    assert!(!devices.is_empty());
}

#[test]
fn the_standalone_network_builds_a_pod_network_and_leaves_nothing() {
    let Some(_) = test_net("the_standalone_network_builds_a_pod_network_and_leaves_nothing") else {
        return;
    };
    // `microvm run --net` works in the caller's namespace: here a throwaway
    // one that this thread (and the threads it starts) enters.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        let host = File::open("/proc/thread-self/ns/net").expect("our namespace");
        let host_link = format!("mvh{}", std::process::id());
        let mut network =
            standalone::StandaloneNetwork::create(None).expect("the standalone network");
        assert_eq!(network.host_link(), host_link);
        assert_eq!(network.host_address(), Ipv4Addr::new(10, 201, 0, 1));
        assert_eq!(network.guest_address(), Ipv4Addr::new(10, 201, 0, 2));
        let pod = network.pod();
        let interfaces = pod.interfaces().to_vec();
        assert_eq!(interfaces.len(), 1, "{interfaces:?}");
        assert_eq!(interfaces[0].name, "eth0");
        assert_eq!(interfaces[0].addresses[0].to_string(), "10.201.0.2/30");
        assert_eq!(
            pod.routes()
                .iter()
                .map(|r| (r.dest, r.gateway))
                .collect::<Vec<_>>(),
            [(None, Some("10.201.0.1".parse().unwrap()))]
        );
        let attachments = pod.take_attachments();
        assert_eq!(attachments.len(), 1);
        let mvh = link_state(&host, &host_link).expect("the host end");
        assert!(mvh.flags.contains(LinkFlags::Up));

        // A frame from the guest reaches the host end.
        let socket = packet_socket(&host, &host_link);
        let mut from_guest = vec![0u8; 10];
        from_guest.extend(frame(&interfaces[0].mac, b"guest-to-host"));
        write_all(&attachments[0].tap, &from_guest);
        assert!(receive(&socket, b"guest-to-host"));

        // A second network in the same namespace takes the next /30
        // (its links are named after the pid, so it comes from elsewhere:
        // only the choice is checked here).
        let used = [Ipv4Addr::new(10, 201, 0, 1)];
        assert_eq!(
            standalone::free_block(standalone::DEFAULT_POOL, &used),
            Some(Ipv4Addr::new(10, 201, 0, 4))
        );

        drop(attachments);
        network.close();
        assert!(
            link_state(&host, &host_link).is_none(),
            "the host end is gone"
        );
        network.close(); // idempotent
    })
    .join()
    .expect("the test thread");
}

#[test]
fn the_wiring_can_live_in_a_shared_pod() {
    fn shared<T: Send + Sync>() {}
    shared::<PodNetwork>();
    shared::<NetDevices>();
    shared::<standalone::StandaloneNetwork>();
}

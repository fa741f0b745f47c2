//! Test helpers: a real tap in a network namespace of its own, and an
//! AF_PACKET socket bound to it that plays "the host network": what it sends
//! comes out of the tap fd (RX for the guest), and it sees what is written
//! into the tap fd (the guest's TX).
//!
//! The namespace is made by a dedicated thread (`unshare(CLONE_NEWNET)`
//! changes only the calling thread); the tap and socket it opens stay in
//! that namespace, which lives as long as they do.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::tap::{ifreq_for, Tap};

const TAP_NAME: &str = "mvnet0";
/// sockaddr_ll.sll_pkttype of frames this host sent (linux/if_packet.h).
const PACKET_OUTGOING: u8 = 4;

pub struct TestTap {
    /// The tap queue (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), for the device.
    pub tap: Option<Tap>,
    /// A duplicate of the tap fd, to poll it without reading.
    pub tap_dup: OwnedFd,
    /// AF_PACKET socket bound to the tap.
    pub packet: OwnedFd,
}

fn os_check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(())
    }
}

/// Why real-tap tests cannot run here, if they cannot.
fn skip_reason(e: &io::Error) -> Option<String> {
    (matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound
    ) || e.raw_os_error() == Some(libc::ENODEV))
    .then(|| format!("no tap here ({e}): needs /dev/net/tun and CAP_NET_ADMIN/CAP_SYS_ADMIN"))
}

/// A tap (up, MTU `mtu`, IPv6 off so the kernel sends nothing on its own)
/// in a fresh netns. `Err` carries the reason to skip the test.
pub fn create(mtu: u32) -> Result<TestTap, String> {
    let made = std::thread::spawn(move || make_in_new_netns(mtu))
        .join()
        .expect("the netns thread panicked");
    match made {
        Ok(tap) => Ok(tap),
        Err(e) => match skip_reason(&e) {
            Some(reason) => Err(reason),
            None => panic!("creating a test tap: {e}"),
        },
    }
}

fn make_in_new_netns(mtu: u32) -> io::Result<TestTap> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    // SAFETY: unshare only moves this (dedicated) thread to a new netns.
    os_check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare")?;
    for knob in ["default", "all"] {
        // Absent without IPv6: nothing to silence then.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
    }
    let tap = Tap::open_named(TAP_NAME).map_err(|e| match e {
        super::NetError::OpenTap { error, .. } => error,
        other => io::Error::other(protocols::error_chain(&other)),
    })?;
    // SAFETY: plain socket creation.
    let control = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    os_check(control, "control socket")?;
    // SAFETY: `control` is a new fd we own.
    let control = unsafe { OwnedFd::from_raw_fd(control) };
    let mut ifreq = ifreq_for(TAP_NAME).expect("valid name");
    ifreq.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    os_check(
        // SAFETY: SIOCSIFMTU reads the ifreq, which lives across the call.
        unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCSIFMTU, &mut ifreq) },
        "SIOCSIFMTU",
    )?;
    os_check(
        // SAFETY: SIOCGIFFLAGS fills the ifreq's flags.
        unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifreq) },
        "SIOCGIFFLAGS",
    )?;
    // SAFETY: SIOCGIFFLAGS set ifru_flags.
    unsafe { ifreq.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    os_check(
        // SAFETY: SIOCSIFFLAGS reads the ifreq.
        unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifreq) },
        "SIOCSIFFLAGS",
    )?;
    os_check(
        // SAFETY: SIOCGIFINDEX fills ifru_ifindex.
        unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifreq) },
        "SIOCGIFINDEX",
    )?;
    // SAFETY: SIOCGIFINDEX set ifru_ifindex.
    let ifindex = unsafe { ifreq.ifr_ifru.ifru_ifindex };

    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation.
    let packet = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol as libc::c_int,
        )
    };
    os_check(packet, "AF_PACKET socket")?;
    // SAFETY: `packet` is a new fd we own.
    let packet = unsafe { OwnedFd::from_raw_fd(packet) };
    // SAFETY: sockaddr_ll is plain old data.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex;
    os_check(
        // SAFETY: bind reads `address`, whose size we pass.
        unsafe {
            libc::bind(
                packet.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        },
        "binding the AF_PACKET socket",
    )?;
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    os_check(
        // SAFETY: SO_RCVTIMEO reads one timeval, whose size we pass.
        unsafe {
            libc::setsockopt(
                packet.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        },
        "SO_RCVTIMEO",
    )?;
    // SAFETY: dup of an fd we own.
    let dup = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    os_check(dup, "dup")?;
    Ok(TestTap {
        tap: Some(tap),
        // SAFETY: `dup` is a new fd we own.
        tap_dup: unsafe { OwnedFd::from_raw_fd(dup) },
        packet,
    })
}

impl TestTap {
    /// "The host" sends `frame` on the tap: it comes out of the tap fd.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: send reads `frame`, whose length we pass.
        let n = unsafe {
            libc::send(
                self.packet.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The next frame the tap received (written into its fd), skipping
    /// what the host sent itself. Fails after 5 s.
    pub fn receive(&self) -> Vec<u8> {
        let mut buffer = vec![0u8; 70_000];
        loop {
            // SAFETY: sockaddr_ll is plain old data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom writes at most the lengths we pass into
            // `buffer` and `from`.
            let n = unsafe {
                libc::recvfrom(
                    self.packet.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            assert!(
                n >= 0,
                "no frame from the tap: {}",
                io::Error::last_os_error()
            );
            if from.sll_pkttype != PACKET_OUTGOING {
                return buffer[..n as usize].to_vec();
            }
        }
    }

    /// Waits (at most 5 s) until the tap fd has a frame to read, without
    /// reading it.
    pub fn wait_tap_readable(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.tap_readable(100) {
            assert!(Instant::now() < deadline, "the tap never became readable");
        }
    }

    /// Whether the tap fd has a frame, waiting up to `timeout_ms`.
    pub fn tap_readable(&self, timeout_ms: i32) -> bool {
        let mut pollfd = libc::pollfd {
            fd: self.tap_dup.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd.
        let n = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
        n == 1 && pollfd.revents & libc::POLLIN != 0
    }
}

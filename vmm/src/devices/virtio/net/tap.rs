//! The host side of the NIC: a tap fd, checked and configured for the
//! device (vnet header of 12 bytes, non-blocking, offloads), and frame I/O
//! with `readv`/`writev` straight to and from guest memory.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::{NetError, VNET_HDR_LEN};

const REQUIRED_FLAGS: [(libc::c_int, &str); 3] = [
    (libc::IFF_TAP, "IFF_TAP"),
    (libc::IFF_NO_PI, "IFF_NO_PI"),
    (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
];

/// An open tap queue, owned by the device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Tests stand a socket pair in for the tap: no tap ioctls then.
    #[cfg(any(test, feature = "fuzz"))]
    pub(super) fake: bool,
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An `ifreq` naming `name` (at most IFNAMSIZ - 1 bytes), flags zero.
pub(super) fn ifreq_for(name: &str) -> Option<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: ifreq is plain old data (a name array and a union of
    // integers, addresses and a pointer): all zeroes is a valid value.
    let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifreq.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    Some(ifreq)
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Takes ownership of an inherited tap fd and configures it. The fd
    /// must have been opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR.
    pub fn from_fd(raw: RawFd) -> Result<Tap, NetError> {
        // SAFETY: F_GETFD only reads the fd's flags; it fails on a closed fd.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(NetError::BadFd {
                fd: raw,
                error: io::Error::last_os_error(),
            });
        }
        // SAFETY: the fd is open (checked above); it is only borrowed
        // until it proves to be a suitable tap.
        let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
        // SAFETY: ifreq is plain old data: all zeroes is a valid value.
        let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq into the one we pass, which
        // lives across the call.
        check(unsafe { ioctl_with_mut_ref(&borrowed, libc::TUNGETIFF, &mut ifreq) })
            .map_err(|error| NetError::NotATap { fd: raw, error })?;
        // SAFETY: the kernel NUL-terminates the name within IFNAMSIZ bytes.
        let name = unsafe { CStr::from_ptr(ifreq.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: TUNGETIFF filled ifru_flags (a c_short) of the union.
        let flags = libc::c_int::from(unsafe { ifreq.ifr_ifru.ifru_flags }) & 0xffff;
        if let Some((_, missing)) = REQUIRED_FLAGS.iter().find(|(flag, _)| flags & flag == 0) {
            return Err(NetError::TapFlags {
                fd: raw,
                name,
                missing,
            });
        }
        // SAFETY: the fd is open and was handed to the VMM for this device:
        // nothing else in this process owns or closes it (the configuration
        // refuses the same fd given twice).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tap = Tap {
            fd,
            name,
            #[cfg(any(test, feature = "fuzz"))]
            fake: false,
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Opens tap `name` in this process's netns (creating it if needed).
    pub fn open_named(name: &str) -> Result<Tap, NetError> {
        let open_err = |error| NetError::OpenTap {
            name: name.to_string(),
            error,
        };
        let mut ifreq = ifreq_for(name).ok_or_else(|| {
            open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the name must be 1 to 15 bytes",
            ))
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(open_err)?;
        let fd = OwnedFd::from(file);
        ifreq.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads (and writes back) one ifreq, which lives
        // across the call.
        check(unsafe { ioctl_with_mut_ref(&fd, libc::TUNSETIFF, &mut ifreq) }).map_err(open_err)?;
        let tap = Tap {
            fd,
            name: name.to_string(),
            #[cfg(any(test, feature = "fuzz"))]
            fake: false,
        };
        tap.configure()?;
        Ok(tap)
    }

    /// A socket standing in for a tap (message boundaries kept), for tests
    /// and the fuzz targets.
    #[cfg(any(test, feature = "fuzz"))]
    pub(crate) fn fake(fd: OwnedFd) -> Tap {
        Tap {
            fd,
            name: "fake".into(),
            fake: true,
        }
    }

    #[cfg(any(test, feature = "fuzz"))]
    fn is_fake(&self) -> bool {
        self.fake
    }

    #[cfg(not(any(test, feature = "fuzz")))]
    fn is_fake(&self) -> bool {
        false
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> NetError + '_ {
        move |error| NetError::TapSetup {
            name: self.name.clone(),
            what,
            error,
        }
    }

    /// Non-blocking, close-on-exec, and a 12-byte vnet header.
    fn configure(&self) -> Result<(), NetError> {
        let raw = self.fd.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL and F_SETFD only change flags of our fd.
        let ret = unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        check(ret).map_err(self.setup_err("making it non-blocking"))?;
        // SAFETY: as above.
        check(unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) })
            .map_err(self.setup_err("setting close-on-exec"))?;
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives across the call.
        check(unsafe { ioctl_with_ref(&self.fd, libc::TUNSETVNETHDRSZ, &size) })
            .map_err(self.setup_err("setting the vnet header size to 12"))?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the guest can receive (TUN_F_* flags): the kernel does in
    /// software whatever is not set, before frames reach the tap's reader.
    pub fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        if self.is_fake() {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        check(unsafe { ioctl_with_val(&self.fd, libc::TUNSETOFFLOAD, flags.into()) })
            .map_err(self.setup_err("setting offloads (TUNSETOFFLOAD)"))
    }

    /// Reads one frame (vnet header first) into `iovecs`. A frame longer
    /// than the buffers is cut to their length (tun returns
    /// `min(frame, buffers)`), and the rest of it is gone.
    pub fn readv(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: every iovec describes memory valid for writes for as long
        // as the caller holds the guest memory (see iov::IoVecBuffer); the
        // count is at most iov::MAX_IOVECS + 1.
        let n = unsafe {
            libc::readv(
                self.fd.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame (vnet header first) gathered from `iovecs`.
    pub fn writev(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: every iovec describes memory valid for reads for as long
        // as the caller holds the guest memory; the kernel only reads it.
        let n = unsafe {
            libc::writev(
                self.fd.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// TUN_F_* offloads for the features the driver acked: what the guest can
/// receive. TSO only counts with checksum offload (the kernel refuses TSO
/// flags without TUN_F_CSUM).
pub fn offload_for(acked_features: u64) -> u32 {
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    };
    let has = |bit: u32| acked_features & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

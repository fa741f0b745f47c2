//! Opening the tap a guest NIC sits on (the open side; the VMM configures
//! the rest on the fd it is given).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Longest interface name (IFNAMSIZ less the NUL).
pub const MAX_NAME: usize = libc::IFNAMSIZ - 1;

/// The tap for a pod's `index`th interface.
pub fn name(index: usize) -> String {
    format!("tap{index}_mvm")
}

/// Creates tap `name` in the calling thread's network namespace:
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, not persistent, so it disappears
/// when the last fd (the returned one and its copies) is closed. The fd is
/// close-on-exec and non-blocking.
pub fn open(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?} (1 to {MAX_NAME} bytes)"),
        ));
    }
    // SAFETY: open(2) on a NUL-terminated literal path; the result is
    // checked before use.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which we own and which
    // outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_bad_names_are_refused() {
        assert_eq!(name(0), "tap0_mvm");
        assert!(name(99999).len() <= MAX_NAME);
        for bad in ["", "a_name_that_is_too_long", "nul\0"] {
            let err = open(bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}

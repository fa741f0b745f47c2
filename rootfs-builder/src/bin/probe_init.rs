//! A tiny static init for proof boots: prints a marker line (with the guest's
//! time since boot) on the console and resets the machine, which ends the
//! VMM. Boot it with `reboot=t` (QEMU: plus `-no-reboot`) or on a VMM that
//! exits on i8042 reset.
//!
//! With `probe_vsock_echo=PORT` on the kernel command line (the kernel hands
//! it to init as an environment variable) it first serves one vsock
//! connection on PORT, echoing every byte back until the host closes it:
//! a guest-side check of a VMM's vsock device that needs no agent.

use std::io::Write;

/// The line a proof boot waits for.
const MARKER: &str = "MICROVM-PROBE-READY";

fn boot_time_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
}

/// Serves one vsock connection on `port`, echoing it back.
fn vsock_echo(port: u32) -> std::io::Result<()> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let check = |ret: libc::c_int| {
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    };
    // SAFETY: plain socket calls on a fd we own, with a correctly sized
    // sockaddr_vm; the accepted fd is owned by the File from then on.
    let mut conn = unsafe {
        let fd = check(libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0))?;
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        check(libc::bind(
            fd,
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        ))?;
        check(libc::listen(fd, 1))?;
        println!("MICROVM-PROBE-VSOCK-LISTENING port={port}");
        std::fs::File::from_raw_fd(check(libc::accept(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        ))?)
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            // The echo may still sit in the socket's send queue, waiting for
            // credit: give it time to leave before the reset ends the VM.
            drop(conn);
            std::thread::sleep(std::time::Duration::from_secs(1));
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

fn main() {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{MARKER} guest_boot_ms={}", boot_time_ms());
    let _ = stdout.flush();
    if let Some(port) = std::env::var("probe_vsock_echo")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        if let Err(e) = vsock_echo(port) {
            println!("probe-init: vsock echo on port {port}: {e}");
        }
    }
    // SAFETY: sync and reboot take no pointers; we are PID 1 and want the VM gone.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on failure; PID 1 must not exit (that panics the kernel).
    eprintln!(
        "probe-init: reboot failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        std::thread::park();
    }
}

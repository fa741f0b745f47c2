//! `hostile`: a guest-side attacker for the attack tests of issue 21
//! (`tests/tests/hostile_guest.rs`), built static into build/ (see
//! scripts/lib.sh) to run in the guest over its share. Busybox cannot open
//! vsock sockets, hold directories open mid-listing or set xattrs.
//!
//! ```text
//! hostile vsock-storm CID PORT COUNT    # COUNT non-blocking connects, each closed
//! hostile opendir-storm DIR COUNT       # COUNT opens of DIR, each read once, kept open
//! hostile setxattr PATH NAME VALUE      # prints `ok` or the errno name;
//!                                       # VALUE `hex:…` gives bytes
//! ```
//!
//! Each prints one line of `key=value` words saying what happened.

use std::ffi::CString;
use std::io;
use std::process::ExitCode;

const USAGE: &str = "usage: hostile vsock-storm CID PORT COUNT\n       \
    hostile opendir-storm DIR COUNT\n       hostile setxattr PATH NAME VALUE";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["vsock-storm", cid, port, count] => {
            vsock_storm(number(cid), number(port), number(count) as usize)
        }
        ["opendir-storm", dir, count] => opendir_storm(dir, number(count) as usize),
        ["setxattr", path, name, value] => set_xattr(path, name, value),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hostile: {e}");
            ExitCode::FAILURE
        }
    }
}

fn number(text: &str) -> u32 {
    text.parse().unwrap_or_else(|_| {
        eprintln!("hostile: {text:?} is not a number\n{USAGE}");
        std::process::exit(2)
    })
}

/// Connects `count` times to `cid:port` without waiting, closing each
/// socket at once (a REQUEST then a RST for the device each time).
fn vsock_storm(cid: u32, port: u32, count: usize) -> io::Result<String> {
    let mut sent = 0;
    let mut failed = 0;
    for _ in 0..count {
        // SAFETY: plain socket calls on a descriptor this loop owns and closes.
        unsafe {
            let fd = libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut addr: libc::sockaddr_vm = std::mem::zeroed();
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_cid = cid;
            addr.svm_port = port;
            let rc = libc::connect(
                fd,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            );
            let error = io::Error::last_os_error().raw_os_error();
            if rc == 0 || error == Some(libc::EINPROGRESS) {
                sent += 1;
            } else {
                failed += 1;
            }
            libc::close(fd);
        }
    }
    Ok(format!("vsock-storm sent={sent} failed={failed}"))
}

/// Opens `dir` `count` times and reads the start of each (which makes the
/// file server list the whole directory), keeping every one open; counts
/// what worked and the errors by name.
fn opendir_storm(dir: &str, count: usize) -> io::Result<String> {
    let path = CString::new(dir).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut held = Vec::new();
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..count {
        // SAFETY: open and getdents64 on a buffer we own; the fd is kept.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            *errors.entry(errno_name()).or_default() += 1;
            continue;
        }
        held.push(fd);
        // SAFETY: the buffer is ours and as long as we say.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            *errors.entry(errno_name()).or_default() += 1;
        }
    }
    let listed = held.len() - errors.values().sum::<usize>().min(held.len());
    let errors: Vec<String> = errors.iter().map(|(e, n)| format!("{e}:{n}")).collect();
    Ok(format!(
        "opendir-storm opened={} read={listed} errors={}",
        held.len(),
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(",")
        }
    ))
}

fn set_xattr(path: &str, name: &str, value: &str) -> io::Result<String> {
    let bad = |_| io::Error::from_raw_os_error(libc::EINVAL);
    let (path, name) = (
        CString::new(path).map_err(bad)?,
        CString::new(name).map_err(bad)?,
    );
    let value: Vec<u8> = match value.strip_prefix("hex:") {
        Some(hex) => (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        None => value.as_bytes().to_vec(),
    };
    // SAFETY: C strings and a value buffer we own.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Ok(if rc == 0 {
        format!("setxattr {} ok", name.to_string_lossy())
    } else {
        format!("setxattr {} {}", name.to_string_lossy(), errno_name())
    })
}

fn errno_name() -> String {
    match io::Error::last_os_error().raw_os_error().unwrap_or(0) {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::ENFILE => "ENFILE".into(),
        libc::EMFILE => "EMFILE".into(),
        libc::ENOTSUP => "ENOTSUP".into(),
        libc::EIO => "EIO".into(),
        other => format!("errno{other}"),
    }
}

//! What the runtime and the VMM (`microvm-vmm`) agree on beyond the agent
//! API: the VMM's command line, as one typed value ([`VmmArgs`]) with one
//! encoder (the runtime's) and one parser (the VMM's).
//!
//! ```text
//! microvm-vmm --kernel VMLINUX [--initrd FILE] [--cpus N] [--memory MIB]
//!             [--cmdline EXTRA] [--console off|stdout|FILE]
//!             [--vsock-uds PATH [--guest-cid CID]] [--fs TAG=HOSTDIR]...
//!             [--net fd=N|tap=NAME,mac=aa:bb:cc:dd:ee:ff[,mtu=M]]...
//!             [--jail EMPTYDIR] [--seccomp on|off|log]
//! ```

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// What the VMM's seccomp filters do with a system call outside a thread's
/// list (`microvm-vmm --seccomp`, the runtime's `[hypervisor] seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seccomp {
    /// The whole VMM is killed (the default).
    #[default]
    On,
    /// The kernel logs the call (audit type 1326) and lets it through: for
    /// measuring the lists, never for production.
    Log,
    /// No filter at all (debugging only; the VMM and runtime warn).
    Off,
}

impl std::str::FromStr for Seccomp {
    type Err = String;
    fn from_str(text: &str) -> Result<Seccomp, String> {
        match text {
            "on" | "kill" | "1" | "true" => Ok(Seccomp::On),
            "log" => Ok(Seccomp::Log),
            "off" | "0" | "false" => Ok(Seccomp::Off),
            other => Err(format!("seccomp {other:?}: give on, off or log")),
        }
    }
}

impl Seccomp {
    /// The VMM's `--seccomp` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Seccomp::On => "on",
            Seccomp::Log => "log",
            Seccomp::Off => "off",
        }
    }
}

/// The usage line the VMM prints with an argument error.
pub const USAGE: &str =
    "usage: microvm-vmm --kernel VMLINUX [--initrd FILE] [--cpus N] [--memory MIB] \
[--cmdline EXTRA] [--console off|stdout|FILE] [--vsock-uds PATH [--guest-cid CID]] \
[--fs TAG=HOSTDIR]... [--net fd=N|tap=NAME,mac=aa:bb:cc:dd:ee:ff[,mtu=M]]... \
[--jail EMPTYDIR] [--seccomp on|off|log]";

/// The guest CID when `--guest-cid` is not given.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// The smallest MTU Linux accepts from virtio-net's config space
/// (ETH_MIN_MTU).
pub const MIN_MTU: u16 = 68;
/// Linux's limit on interface names, with their NUL.
const IFNAMSIZ: usize = 16;

/// Everything `microvm-vmm` is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmArgs {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Appended to the VMM's own kernel command line.
    pub cmdline: String,
    pub console: Console,
    pub vsock: Option<Vsock>,
    /// virtio-fs shares, in device order.
    pub fs: Vec<Share>,
    /// NICs, eth0 first.
    pub net: Vec<NetConfig>,
    /// `--jail EMPTYDIR`: confine the VMM, its root a tmpfs on EMPTYDIR.
    pub jail: Option<PathBuf>,
    pub seccomp: Seccomp,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Console {
    /// Discarded; the guest is told to be quiet, which also keeps boot fast.
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

/// Hybrid vsock: the host Unix socket bridged to the guest's vsock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vsock {
    pub uds: PathBuf,
    pub guest_cid: u64,
}

/// A virtio-fs share: a host directory the guest mounts by tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub dir: PathBuf,
}

/// Where a NIC's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// An fd inherited from the parent, opened with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; the device takes ownership of it.
    Fd(i32),
    /// A tap opened (created if needed) by name in the VMM's own netns.
    Name(String),
}

/// One NIC: `fd=N|tap=NAME,mac=aa:bb:cc:dd:ee:ff[,mtu=M]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSource,
    pub mac: [u8; 6],
    /// The MTU the guest is given (its `max_mtu`); the device's default
    /// when unset.
    pub mtu: Option<u16>,
}

/// Why a `--net` value was refused: the part named, and what is expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{part:?}: {expected}")]
pub struct NetConfigError {
    pub part: String,
    pub expected: &'static str,
}

/// Why a VMM command line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("{0} needs a value\n{USAGE}")]
    MissingValue(String),
    #[error("{flag} {value}: {expected}")]
    BadValue {
        flag: &'static str,
        value: String,
        expected: String,
    },
    #[error("--net {0}")]
    Net(String, #[source] NetConfigError),
    #[error("unknown argument {0:?}\n{USAGE}")]
    Unknown(String),
    #[error("--kernel is required\n{USAGE}")]
    NoKernel,
}

impl VmmArgs {
    /// A VM of one vCPU and 128 MiB booting `kernel`, nothing else.
    pub fn new(kernel: impl Into<PathBuf>) -> VmmArgs {
        VmmArgs {
            kernel: kernel.into(),
            initrd: None,
            cpus: 1,
            memory_mib: 128,
            cmdline: String::new(),
            console: Console::Off,
            vsock: None,
            fs: Vec::new(),
            net: Vec::new(),
            jail: None,
            seccomp: Seccomp::On,
        }
    }

    /// The command line (without the program) that [`VmmArgs::parse`]
    /// reads back as `self`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: &OsStr| {
            args.push(flag.into());
            args.push(value.to_owned());
        };
        push("--kernel", self.kernel.as_os_str());
        if let Some(initrd) = &self.initrd {
            push("--initrd", initrd.as_os_str());
        }
        push("--cpus", OsStr::new(&self.cpus.to_string()));
        push("--memory", OsStr::new(&self.memory_mib.to_string()));
        if !self.cmdline.is_empty() {
            push("--cmdline", OsStr::new(&self.cmdline));
        }
        match &self.console {
            Console::Off => push("--console", OsStr::new("off")),
            Console::Stdout => push("--console", OsStr::new("stdout")),
            Console::File(path) => push("--console", path.as_os_str()),
        }
        if let Some(vsock) = &self.vsock {
            push("--vsock-uds", vsock.uds.as_os_str());
            push("--guest-cid", OsStr::new(&vsock.guest_cid.to_string()));
        }
        for share in &self.fs {
            let mut value = OsString::from(format!("{}=", share.tag));
            value.push(&share.dir);
            push("--fs", &value);
        }
        for nic in &self.net {
            push("--net", OsStr::new(&nic.to_string()));
        }
        if let Some(jail) = &self.jail {
            push("--jail", jail.as_os_str());
        }
        if self.seccomp != Seccomp::On {
            push("--seccomp", OsStr::new(self.seccomp.as_arg()));
        }
        args
    }

    /// Reads a VMM command line (without the program).
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<VmmArgs, ArgsError> {
        let mut parsed = VmmArgs::new(PathBuf::new());
        let mut kernel = None;
        let mut uds = None;
        let mut guest_cid = DEFAULT_GUEST_CID;
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let Some(flag) = flag.to_str().map(str::to_owned) else {
                return Err(ArgsError::Unknown(flag.to_string_lossy().into_owned()));
            };
            let mut value = || {
                args.next()
                    .ok_or_else(|| ArgsError::MissingValue(flag.clone()))
            };
            match flag.as_str() {
                "--kernel" => kernel = Some(PathBuf::from(value()?)),
                "--initrd" => parsed.initrd = Some(PathBuf::from(value()?)),
                "--cpus" => parsed.cpus = number("--cpus", value()?, "give a number")?,
                "--memory" => parsed.memory_mib = number("--memory", value()?, "give MiB")?,
                "--cmdline" => parsed.cmdline = text("--cmdline", value()?)?,
                "--console" => {
                    let value = value()?;
                    parsed.console = match value.as_bytes() {
                        b"off" => Console::Off,
                        b"stdout" | b"-" => Console::Stdout,
                        _ => Console::File(PathBuf::from(value)),
                    }
                }
                "--vsock-uds" => uds = Some(PathBuf::from(value()?)),
                "--guest-cid" => guest_cid = number("--guest-cid", value()?, "give a number")?,
                "--fs" => {
                    let value = value()?;
                    let bytes = value.as_bytes();
                    let Some(split) = bytes.iter().position(|b| *b == b'=') else {
                        return Err(bad("--fs", &value, "give TAG=HOSTDIR"));
                    };
                    let tag = std::str::from_utf8(&bytes[..split])
                        .map_err(|_| bad("--fs", &value, "the tag must be UTF-8"))?;
                    parsed.fs.push(Share {
                        tag: tag.to_string(),
                        dir: PathBuf::from(OsString::from_vec(bytes[split + 1..].to_vec())),
                    });
                }
                "--net" => {
                    let value = text("--net", value()?)?;
                    let nic = value
                        .parse::<NetConfig>()
                        .map_err(|e| ArgsError::Net(value.clone(), e))?;
                    parsed.net.push(nic);
                }
                "--jail" => parsed.jail = Some(PathBuf::from(value()?)),
                "--seccomp" => {
                    let value = text("--seccomp", value()?)?;
                    parsed.seccomp = value
                        .parse()
                        .map_err(|expected| bad("--seccomp", OsStr::new(&value), expected))?;
                }
                _ => return Err(ArgsError::Unknown(flag)),
            }
        }
        parsed.kernel = kernel.ok_or(ArgsError::NoKernel)?;
        parsed.vsock = uds.map(|uds| Vsock { uds, guest_cid });
        Ok(parsed)
    }
}

fn bad(flag: &'static str, value: &OsStr, expected: impl Into<String>) -> ArgsError {
    ArgsError::BadValue {
        flag,
        value: value.to_string_lossy().into_owned(),
        expected: expected.into(),
    }
}

fn text(flag: &'static str, value: OsString) -> Result<String, ArgsError> {
    value
        .into_string()
        .map_err(|value| bad(flag, &value, "give UTF-8 text"))
}

fn number<T: std::str::FromStr>(
    flag: &'static str,
    value: OsString,
    expected: &str,
) -> Result<T, ArgsError> {
    value
        .to_str()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| bad(flag, &value, expected))
}

/// `aa:bb:cc:dd:ee:ff` (hex, either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn net_error(part: &str, expected: &'static str) -> NetConfigError {
    NetConfigError {
        part: part.to_string(),
        expected,
    }
}

impl std::fmt::Display for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tap {
            TapSource::Fd(fd) => write!(f, "fd={fd}")?,
            TapSource::Name(name) => write!(f, "tap={name}")?,
        }
        let m = self.mac;
        write!(
            f,
            ",mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )?;
        if let Some(mtu) = self.mtu {
            write!(f, ",mtu={mtu}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        let mut mtu = None;
        for part in value.split(',') {
            let (key, val) = part
                .split_once('=')
                .ok_or_else(|| net_error(part, "expected KEY=VALUE (keys: fd, tap, mac, mtu)"))?;
            match key {
                "fd" | "tap" if tap.is_some() => {
                    return Err(net_error(part, "give exactly one of fd= or tap="))
                }
                "fd" => {
                    let fd: i32 = val
                        .parse()
                        .ok()
                        .filter(|fd| *fd >= 0)
                        .ok_or_else(|| net_error(part, "fd= takes a file descriptor number"))?;
                    tap = Some(TapSource::Fd(fd));
                }
                "tap" => {
                    if val.is_empty() || val.len() >= IFNAMSIZ || val.contains('/') {
                        return Err(net_error(
                            part,
                            "tap= takes an interface name of 1 to 15 bytes",
                        ));
                    }
                    tap = Some(TapSource::Name(val.to_string()));
                }
                "mac" if mac.is_some() => return Err(net_error(part, "mac= given twice")),
                "mac" => {
                    let parsed = parse_mac(val).ok_or_else(|| {
                        net_error(part, "mac= takes six hex bytes aa:bb:cc:dd:ee:ff")
                    })?;
                    if parsed[0] & 1 != 0 {
                        return Err(net_error(part, "mac= must be a unicast address"));
                    }
                    mac = Some(parsed);
                }
                "mtu" if mtu.is_some() => return Err(net_error(part, "mtu= given twice")),
                "mtu" => {
                    mtu = Some(
                        val.parse::<u16>()
                            .ok()
                            .filter(|mtu| *mtu >= MIN_MTU)
                            .ok_or_else(|| {
                                net_error(part, "mtu= takes a number from 68 to 65535")
                            })?,
                    );
                }
                _ => return Err(net_error(part, "unknown key (keys: fd, tap, mac, mtu)")),
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or_else(|| net_error(value, "fd=N or tap=NAME is required"))?,
            mac: mac.ok_or_else(|| net_error(value, "mac=aa:bb:cc:dd:ee:ff is required"))?,
            mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &[&str]) -> Vec<OsString> {
        text.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_full_command_line_round_trips() {
        let vmm = VmmArgs {
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initramfs.cpio".into()),
            cpus: 2,
            memory_mib: 512,
            cmdline: "quiet agent.log=debug".into(),
            console: Console::File("/run/x/console.log".into()),
            vsock: Some(Vsock {
                uds: "/run/x/vsock.sock".into(),
                guest_cid: 7,
            }),
            fs: vec![
                Share {
                    tag: "microvm".into(),
                    dir: "/run/x/shared".into(),
                },
                Share {
                    tag: "data".into(),
                    dir: PathBuf::from(OsString::from_vec(b"/odd=\xff".to_vec())),
                },
            ],
            net: vec![
                NetConfig {
                    tap: TapSource::Fd(5),
                    mac: [0x02, 0, 0, 0, 0xab, 0x01],
                    mtu: Some(1400),
                },
                NetConfig {
                    tap: TapSource::Name("tap1".into()),
                    mac: [0x02, 0, 0, 0, 0, 0x02],
                    mtu: None,
                },
            ],
            jail: Some("/run/x/root".into()),
            seccomp: Seccomp::Log,
        };
        assert_eq!(VmmArgs::parse(vmm.to_args()), Ok(vmm.clone()));
        let minimal = VmmArgs::new("/k/vmlinux");
        assert_eq!(VmmArgs::parse(minimal.to_args()), Ok(minimal));
    }

    #[test]
    fn bad_command_lines_name_what_is_wrong() {
        let kernel = ["--kernel", "/k"];
        let cases: &[(&[&str], &str)] = &[
            (&[], "--kernel is required"),
            (&["--cpus"], "--cpus needs a value"),
            (&["--cpus", "two"], "--cpus two: give a number"),
            (&["--cpus", "300"], "--cpus 300: give a number"),
            (&["--memory", "-1"], "--memory -1: give MiB"),
            (&["--fs", "nodir"], "--fs nodir: give TAG=HOSTDIR"),
            (
                &["--seccomp", "maybe"],
                "--seccomp maybe: seccomp \"maybe\"",
            ),
            (&["--net", "fd=3"], "--net fd=3"),
            (&["--bogus"], "unknown argument \"--bogus\""),
        ];
        for (extra, expected) in cases {
            let mut line = if extra.is_empty() {
                vec![]
            } else {
                args(&kernel)
            };
            line.extend(args(extra));
            let error = VmmArgs::parse(line).expect_err(expected);
            assert!(
                crate::error_chain(&error).contains(expected),
                "{extra:?}: {}",
                crate::error_chain(&error)
            );
        }
    }

    #[test]
    fn net_values_round_trip_and_bad_ones_name_their_part() {
        let nic: NetConfig = "fd=7,mac=AA:bb:cc:dd:ee:0f,mtu=1400".parse().unwrap();
        assert_eq!(
            nic,
            NetConfig {
                tap: TapSource::Fd(7),
                mac: [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f],
                mtu: Some(1400),
            }
        );
        assert_eq!(nic.to_string().parse::<NetConfig>(), Ok(nic));
        let nic: NetConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(nic.tap, TapSource::Name("tap0".into()));
        assert_eq!(nic.mtu, None);
        for (bad, part) in [
            ("fd=x,mac=02:00:00:00:00:01", "fd=x"),
            ("fd=-1,mac=02:00:00:00:00:01", "fd=-1"),
            ("fd=3,mac=02:00:00:00:00", "mac=02:00:00:00:00"),
            ("fd=3,mac=02:00:00:00:00:01:02", "mac=02:00:00:00:00:01:02"),
            ("fd=3,mac=02:00:00:00:00:1", "mac=02:00:00:00:00:1"),
            ("fd=3,mac=02:00:00:00:00:zz", "mac=02:00:00:00:00:zz"),
            ("fd=3,mac=01:00:5e:00:00:01", "mac=01:00:5e:00:00:01"),
            ("fd=3,mac=02:00:00:00:00:01,mtu=67", "mtu=67"),
            ("fd=3,mac=02:00:00:00:00:01,mtu=65536", "mtu=65536"),
            ("fd=3,mac=02:00:00:00:00:01,mtu=", "mtu="),
            ("fd=3,tap=t,mac=02:00:00:00:00:01", "tap=t"),
            ("tap=,mac=02:00:00:00:00:01", "tap="),
            (
                "tap=sixteen-bytes-xx,mac=02:00:00:00:00:01",
                "tap=sixteen-bytes-xx",
            ),
            ("fd=3,mac=02:00:00:00:00:01,speed=10", "speed=10"),
            (
                "fd=3,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02",
                "mac=02:00:00:00:00:02",
            ),
            ("fd=3,mac", "mac"),
            ("fd=3", "fd=3"),
            ("mac=02:00:00:00:00:01", "mac=02:00:00:00:00:01"),
            ("", ""),
        ] {
            let err = bad.parse::<NetConfig>().unwrap_err();
            assert_eq!(err.part, part, "{bad:?}: {err}");
            assert!(err.to_string().starts_with(&format!("{part:?}: ")), "{err}");
        }
    }

    #[test]
    fn seccomp_values_round_trip() {
        for mode in [Seccomp::On, Seccomp::Log, Seccomp::Off] {
            assert_eq!(mode.as_arg().parse::<Seccomp>(), Ok(mode));
        }
        assert_eq!("kill".parse::<Seccomp>(), Ok(Seccomp::On));
        assert!("maybe".parse::<Seccomp>().unwrap_err().contains("maybe"));
    }
}

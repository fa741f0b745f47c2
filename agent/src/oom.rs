//! Which processes the guest kernel's OOM killer ended, from its log
//! (`/dev/kmsg`): a container's memory.events only counts OOM kills, and a
//! process that died of SIGKILL may have been killed by anyone. The kernel
//! logs each kill as `Memory cgroup out of memory: Killed process PID
//! (COMM) ...` (`Out of memory: ...` when the whole guest ran out), and,
//! unless rate-limited, a summary line before it naming the victim's
//! cgroup: `oom-kill:constraint=...,task_memcg=PATH,task=COMM,pid=PID,...`.

use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;

/// The kernel log as a reader sees it.
const KMSG: &str = "/dev/kmsg";
/// At most this many kills are kept from one reading of the log (the
/// newest), whatever the guest logged.
const MAX_KILLS: usize = 256;
/// A kernel log record is at most this long (the kernel's own limit is
/// ~8 KiB; a longer read is refused by it).
const RECORD_MAX: usize = 8192;

/// One process the OOM killer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomKill {
    /// When, in microseconds since the guest booted (the log's clock).
    pub at_usec: u64,
    /// Its pid in the guest's root pid namespace.
    pub pid: u32,
    /// Its command name (comm), as the kernel logged it.
    pub comm: String,
    /// Its memory cgroup (relative to the cgroup root, e.g.
    /// `/microvm/c1`), when the kernel logged the summary line.
    pub memcg: Option<String>,
}

impl std::fmt::Display for OomKill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.comm, self.pid)
    }
}

/// The OOM kills still in the kernel's log buffer, oldest first; empty when
/// the log cannot be read.
pub fn kills() -> Vec<OomKill> {
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(KMSG)
    else {
        return Vec::new();
    };
    let mut records = Vec::new();
    let mut buffer = vec![0u8; RECORD_MAX];
    // Each read returns one record; EPIPE says records were overwritten
    // meanwhile (the next read goes on with the oldest left), EAGAIN that
    // the end is reached.
    loop {
        match kmsg.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => records.push(String::from_utf8_lossy(&buffer[..n]).into_owned()),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    parse(records.iter().map(String::as_str))
}

/// The kills named by kernel log records (`/dev/kmsg` format:
/// `PRIO,SEQ,USEC,FLAGS;MESSAGE`, then dictionary lines starting with a
/// space), the newest [`MAX_KILLS`] of them.
pub fn parse<'a>(records: impl Iterator<Item = &'a str>) -> Vec<OomKill> {
    let mut kills = Vec::new();
    // The summary line's cgroup, for the victim the next kill line names.
    let mut summary: Option<(u32, String)> = None;
    for record in records {
        let Some((prefix, message)) = record.split_once(';') else {
            continue;
        };
        let message = message.lines().next().unwrap_or_default();
        let at_usec = prefix
            .split(',')
            .nth(2)
            .and_then(|usec| usec.parse().ok())
            .unwrap_or(0);
        if let Some(summary_line) = message.strip_prefix("oom-kill:") {
            summary = parse_summary(summary_line);
        } else if let Some((pid, comm)) = parse_kill(message) {
            let memcg = summary
                .take()
                .filter(|(victim, _)| *victim == pid)
                .map(|(_, memcg)| memcg);
            kills.push(OomKill {
                at_usec,
                pid,
                comm,
                memcg,
            });
            if kills.len() > MAX_KILLS {
                kills.remove(0);
            }
        }
    }
    kills
}

/// `constraint=...,task_memcg=PATH,task=COMM,pid=PID,uid=UID`: the
/// victim's pid and cgroup. Its fields are comma-separated; a cgroup path
/// or command name with a comma in it is not told apart (the kill line
/// still is).
fn parse_summary(line: &str) -> Option<(u32, String)> {
    let mut memcg = None;
    let mut pid = None;
    for field in line.split(',') {
        if let Some(path) = field.strip_prefix("task_memcg=") {
            memcg = Some(path.to_string());
        } else if let Some(value) = field.strip_prefix("pid=") {
            pid = value.parse().ok();
        }
    }
    Some((pid?, memcg?))
}

/// `...: Killed process PID (COMM) total-vm:...`: the victim.
fn parse_kill(message: &str) -> Option<(u32, String)> {
    let (_, rest) = message.split_once("Killed process ")?;
    let (pid, rest) = rest.split_once(' ')?;
    let pid = pid.parse().ok()?;
    let rest = rest.strip_prefix('(')?;
    // The command name may hold ") ": the last ") total-vm" ends it.
    let end = rest.rfind(") total-vm").or_else(|| rest.rfind(')'))?;
    Some((pid, rest[..end].to_string()))
}

/// Whether `memcg` (as the kernel logs it) is the cgroup at `path` (below
/// the cgroup root `root`) or one below it.
pub fn in_cgroup(memcg: &str, root: &std::path::Path, path: &std::path::Path) -> bool {
    let Ok(relative) = path.strip_prefix(root) else {
        return false;
    };
    let cgroup = format!("/{}", relative.display());
    memcg == cgroup || memcg.starts_with(&format!("{cgroup}/"))
}

/// Microseconds since boot on the clock the kernel log uses (near enough:
/// both count from boot; used to ignore kills logged before a process
/// started).
pub fn now_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const LOG: &[&str] = &[
        "6,301,1000,-;tail invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "6,330,1200,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/microvm/c1,task_memcg=/microvm/c1,task=tail,pid=42,uid=0",
        "3,331,1300,-;Memory cgroup out of memory: Killed process 42 (tail) total-vm:420000kB, anon-rss:120000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:300kB oom_score_adj:0\n SUBSYSTEM=memory",
        "3,340,5000,-;Out of memory: Killed process 77 (a) b) total-vm:1kB, anon-rss:1kB",
        "6,341,5001,-;unrelated line",
    ];

    #[test]
    fn kills_are_read_with_their_cgroup() {
        let kills = parse(LOG.iter().copied());
        assert_eq!(
            kills,
            vec![
                OomKill {
                    at_usec: 1300,
                    pid: 42,
                    comm: "tail".into(),
                    memcg: Some("/microvm/c1".into()),
                },
                OomKill {
                    at_usec: 5000,
                    pid: 77,
                    comm: "a) b".into(),
                    memcg: None,
                },
            ]
        );
        assert_eq!(kills[0].to_string(), "tail (pid 42)");
    }

    #[test]
    fn a_summary_for_another_pid_gives_no_cgroup() {
        let log = [
            "6,1,10,-;oom-kill:constraint=CONSTRAINT_MEMCG,task_memcg=/microvm/x,task=a,pid=5,uid=0",
            "3,2,11,-;Memory cgroup out of memory: Killed process 6 (b) total-vm:1kB",
        ];
        let kills = parse(log.iter().copied());
        assert_eq!(kills.len(), 1);
        assert_eq!(kills[0].memcg, None);
    }

    #[test]
    fn garbage_is_skipped_and_kills_are_bounded() {
        let mut log: Vec<String> =
            vec!["no separator".into(), ";".into(), "x;Killed process".into()];
        for pid in 0..(MAX_KILLS as u32 + 10) {
            log.push(format!(
                "3,{pid},{pid},-;Out of memory: Killed process {pid} (p) total-vm:1kB"
            ));
        }
        let kills = parse(log.iter().map(String::as_str));
        assert_eq!(kills.len(), MAX_KILLS);
        assert_eq!(kills.last().unwrap().pid, MAX_KILLS as u32 + 9);
    }

    #[test]
    fn cgroups_match_themselves_and_below_only() {
        let root = Path::new("/sys/fs/cgroup");
        let c1 = Path::new("/sys/fs/cgroup/microvm/c1");
        assert!(in_cgroup("/microvm/c1", root, c1));
        assert!(in_cgroup("/microvm/c1/sub", root, c1));
        assert!(!in_cgroup("/microvm/c10", root, c1));
        assert!(!in_cgroup("/", root, c1));
    }
}

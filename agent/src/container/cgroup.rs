//! A container's cgroup v2 directory in the guest: limits from the spec's
//! `linux.resources`, the freezer, statistics, OOM events, removal.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use super::ContainerError;

/// Where the guest's cgroup2 hierarchy is mounted.
pub const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every container's cgroup.
const PARENT: &str = "microvm";
const CONTROLLERS: &str = "+cpu +memory +pids +io";

pub struct Cgroup {
    path: PathBuf,
}

fn io_error(what: String, e: std::io::Error) -> ContainerError {
    ContainerError::Cgroup(format!("{what}: {e}"))
}

/// Enables the controllers for the parent and creates it.
fn prepare_parent(root: &Path) -> Result<PathBuf, ContainerError> {
    let parent = root.join(PARENT);
    // Controllers the kernel lacks are skipped one by one.
    for controller in CONTROLLERS.split(' ') {
        let _ = fs::write(root.join("cgroup.subtree_control"), controller);
    }
    fs::create_dir_all(&parent)
        .map_err(|e| io_error(format!("creating {}", parent.display()), e))?;
    for controller in CONTROLLERS.split(' ') {
        let _ = fs::write(parent.join("cgroup.subtree_control"), controller);
    }
    Ok(parent)
}

impl Cgroup {
    /// Creates the container's cgroup (an error if it exists).
    pub fn create(container_id: &str) -> Result<Cgroup, ContainerError> {
        let parent = prepare_parent(Path::new(ROOT))?;
        let path = parent.join(container_id);
        fs::create_dir(&path).map_err(|e| io_error(format!("creating {}", path.display()), e))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, file: &str, value: &str) -> Result<(), ContainerError> {
        fs::write(self.path.join(file), value)
            .map_err(|e| io_error(format!("writing {value:?} to {file}"), e))
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// Applies the spec's resources (memory, cpu, pids, unified).
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), ContainerError> {
        if let Some(memory) = resources.memory() {
            if let Some(limit) = memory.limit() {
                self.write("memory.max", &limit_value(limit))?;
                if let Some(swap) = memory.swap() {
                    // OCI's swap is memory+swap; cgroup v2 counts swap alone.
                    let swap_only = if swap < 0 || limit < 0 {
                        "max".to_string()
                    } else {
                        (swap - limit).max(0).to_string()
                    };
                    let _ = self.write("memory.swap.max", &swap_only);
                }
            }
            if let Some(reservation) = memory.reservation() {
                self.write("memory.low", &limit_value(reservation))?;
            }
        }
        if let Some(cpu) = resources.cpu() {
            if let Some(shares) = cpu.shares() {
                if shares > 0 {
                    // runc's mapping of shares [2, 262144] onto weight [1, 10000].
                    let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
                    self.write("cpu.weight", &weight.to_string())?;
                }
            }
            if cpu.quota().is_some() || cpu.period().is_some() {
                let quota = match cpu.quota() {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".to_string(),
                };
                let period = cpu.period().unwrap_or(100_000);
                self.write("cpu.max", &format!("{quota} {period}"))?;
            }
        }
        if let Some(pids) = resources.pids() {
            self.write("pids.max", &limit_value(pids.limit()))?;
        }
        for (key, value) in resources.unified().clone().unwrap_or_default() {
            if key.contains('/') {
                return Err(ContainerError::InvalidSpec(format!(
                    "unified cgroup key {key:?} names a path"
                )));
            }
            self.write(&key, &value)?;
        }
        Ok(())
    }

    /// Freezes (true) or thaws the cgroup and waits until it is so.
    pub fn freeze(&self, frozen: bool) -> Result<(), ContainerError> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.read("cgroup.events").lines().any(|l| l == want) {
            if Instant::now() > deadline {
                return Err(ContainerError::Cgroup(format!(
                    "{} did not become {want} within 5 s",
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    pub fn is_frozen(&self) -> bool {
        self.read("cgroup.events").lines().any(|l| l == "frozen 1")
    }

    /// Pids of every process in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        self.read("cgroup.procs")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// memory.events' oom_kill count.
    pub fn oom_kills(&self) -> u64 {
        key_values(&self.read("memory.events"))
            .get("oom_kill")
            .copied()
            .unwrap_or(0)
    }

    /// Kills every process in the cgroup (cgroup.kill) and waits until it
    /// is empty.
    pub fn kill_all(&self) -> Result<(), ContainerError> {
        if self.pids().is_empty() {
            return Ok(());
        }
        self.write("cgroup.kill", "1")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self
            .read("cgroup.events")
            .lines()
            .any(|l| l == "populated 1")
        {
            if Instant::now() > deadline {
                return Err(ContainerError::Cgroup(format!(
                    "processes of {} did not die within 5 s",
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Removes the (empty) cgroup.
    pub fn remove(&self) -> Result<(), ContainerError> {
        match fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(format!("removing {}", self.path.display()), e)),
        }
    }

    pub fn stats(&self) -> protocols::agent::StatsContainerResponse {
        use protocols::agent::*;
        let cpu = key_values(&self.read("cpu.stat"));
        let memory_events = key_values(&self.read("memory.events"));
        let memory_stat = key_values(&self.read("memory.stat"));
        let number = |file: &str| self.read(file).trim().parse::<u64>().unwrap_or(0);
        let io = self
            .read("io.stat")
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let (major, minor) = words.next()?.split_once(':')?;
                let fields: HashMap<&str, u64> = words
                    .filter_map(|w| {
                        let (k, v) = w.split_once('=')?;
                        Some((k, v.parse().ok()?))
                    })
                    .collect();
                Some(IoEntry {
                    major: major.parse().ok()?,
                    minor: minor.parse().ok()?,
                    rbytes: fields.get("rbytes").copied().unwrap_or(0),
                    wbytes: fields.get("wbytes").copied().unwrap_or(0),
                    rios: fields.get("rios").copied().unwrap_or(0),
                    wios: fields.get("wios").copied().unwrap_or(0),
                    ..Default::default()
                })
            })
            .collect();
        let get = |map: &HashMap<String, u64>, key: &str| map.get(key).copied().unwrap_or(0);
        StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: get(&cpu, "usage_usec"),
                user_usec: get(&cpu, "user_usec"),
                system_usec: get(&cpu, "system_usec"),
                nr_periods: get(&cpu, "nr_periods"),
                nr_throttled: get(&cpu, "nr_throttled"),
                throttled_usec: get(&cpu, "throttled_usec"),
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage: number("memory.current"),
                limit: number("memory.max"),
                swap_usage: number("memory.swap.current"),
                oom_events: get(&memory_events, "oom"),
                oom_kill_events: get(&memory_events, "oom_kill"),
                stat: memory_stat,
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStats {
                current: number("pids.current"),
                limit: number("pids.max"),
                ..Default::default()
            })
            .into(),
            io,
            ..Default::default()
        }
    }
}

fn limit_value(value: i64) -> String {
    if value < 0 {
        "max".to_string()
    } else {
        value.to_string()
    }
}

/// "key value" lines as a map.
fn key_values(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

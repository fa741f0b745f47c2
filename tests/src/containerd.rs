//! A private containerd (Debian's 1.6) where VMs run, for testing runc and
//! our shim (`containerd-shim-kata-v2`) through `ctr` and CRI.
//!
//! Each [`Containerd`] is its own daemon with its own directory (config,
//! root, state, sockets, CRI logs), ctr namespace and cgroup, so tests may
//! run several at once in one test host. The instance imports the busybox
//! test image as [`IMAGE`] and a pause image as [`PAUSE_IMAGE`] (so CRI never
//! pulls). Dropping it tears everything down; [`Containerd::leftovers`]
//! says what a runtime left behind.
//!
//! With [`Options::network`] the instance runs in a network namespace of its
//! own (named after it) with a CNI configuration ([`conflist`]): pods made
//! with `--pod-network` get a veth on the bridge [`BRIDGE`] there and an
//! address in [`POD_SUBNET`]; [`Containerd::sh_in_netns`] runs commands on
//! that side (the "node" of the pods). Bridge, gateway and pods live only in
//! that namespace, so instances running at once never clash, though they
//! all use the same names and subnet.
//!
//! In an integration test (where cargo sets `CARGO_BIN_EXE_*`):
//!
//! ```ignore
//! use microvm_tests::containerd::*;
//! let host = microvm_tests::vm_host(env!("CARGO_BIN_EXE_testhost"));
//! let mut cd = Containerd::start(host, Options::new(env!("CARGO_BIN_EXE_cri")))?;
//! let id = cd.id("hello");
//! let out = cd.ctr(&["run", "--rm", "--runtime", RUNC_RUNTIME, IMAGE, &id, "echo", "hi"])?;
//! cd.stop()?;
//! assert_eq!(cd.leftovers()?, Vec::<String>::new());
//! ```

mod config;
mod network;
mod pod;
mod scripts;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{target_dir, Output, VmHost};

pub use config::{config_toml, pause_archive, IMAGE, KATA_RUNTIME, PAUSE_IMAGE, RUNC_RUNTIME};
pub use network::{
    conflist, BRIDGE, CNI_NETWORK, POD_GATEWAY, POD_GATEWAY6, POD_MTU, POD_PREFIX_LEN, POD_SUBNET,
    POD_SUBNET6,
};
pub use pod::Pod;

/// The CRI runtime handler for runc.
pub const RUNC_HANDLER: &str = "runc";
/// The CRI runtime handler for our shim.
pub const KATA_HANDLER: &str = "kata";
/// Our shim's binary, looked up on containerd's PATH.
pub const KATA_SHIM: &str = "containerd-shim-kata-v2";
/// Where our shim keeps its pods (`runtime/src/shim`'s `STATE_ROOT`), as
/// `NAMESPACE/POD`.
pub const KATA_STATE_ROOT: &str = "/run/microvm";

/// How long one command may take where VMs run (single-vCPU TCG test hosts
/// are 10–50 times slower than this machine).
pub const TIMEOUT: Duration = Duration::from_secs(600);

/// How long (seconds) shims started by [`Containerd::start_for_test`] wait
/// for their agent.
pub const AGENT_TIMEOUT_SECS: &str = "120";

/// The text of a JSON string value, empty when it is not one.
pub fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// Where instances keep their directories (where VMs run).
pub const BASE_DIR: &str = "/run/microvm-containerd";

/// How to start a [`Containerd`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The CRI client (`env!("CARGO_BIN_EXE_cri")`): the tests' and the
    /// teardown's way to CRI.
    pub cri: PathBuf,
    /// Put first on containerd's PATH, so it finds `containerd-shim-kata-v2`
    /// there: by default the workspace's `target/debug`.
    pub shim_dir: PathBuf,
    /// Extra environment for containerd and so for the shims it starts
    /// (`MICROVM_AGENT_TIMEOUT`, `MICROVM_VMM`, …).
    pub env: Vec<(String, String)>,
    /// containerd logs at debug level (and passes shims `-debug`).
    pub debug: bool,
    /// The kata runtime's option `ConfigPath`: our shim's configuration.
    pub kata_config: Option<String>,
    /// A configuration file's text to run containerd with instead of
    /// [`config_toml`]'s (a user's, say Debian's stock file edited by
    /// `microvm install`): only what keeps the instance private is added
    /// (`root`, `state`, and the `grpc`/`ttrpc` sockets, which the text
    /// must not set). [`Options::debug`] and [`Options::kata_config`] do not
    /// apply.
    pub config: Option<String>,
    /// How long containerd may take to answer after its start, and to stop.
    pub wait: Duration,
    /// Pod networking: containerd runs in a network namespace made for it
    /// (`/run/netns/NAME`, deleted at stop), with the CNI configuration
    /// [`conflist`] (bridge [`BRIDGE`], host-local IPAM in `DIR/ipam`), so
    /// `--pod-network` pods get an address. Off: containerd runs in the
    /// caller's network namespace and CNI has no configuration.
    pub network: bool,
}

impl Options {
    pub fn new(cri: impl Into<PathBuf>) -> Options {
        Options {
            cri: cri.into(),
            shim_dir: target_dir().join("debug"),
            env: Vec::new(),
            debug: false,
            kata_config: None,
            config: None,
            wait: Duration::from_secs(120),
            network: false,
        }
    }

    /// Fails, saying how to build it, unless the shim that `runtime` (a
    /// runtime name or CRI handler) needs is in [`Options::shim_dir`]; runc's
    /// comes with containerd.
    pub fn require_shim(&self, runtime: &str) -> Result<()> {
        if runtime != KATA_RUNTIME && runtime != KATA_HANDLER {
            return Ok(());
        }
        let shim = self.shim_dir.join(KATA_SHIM);
        if !shim.is_file() {
            bail!(
                "{} is missing: build it (cargo build --workspace --bins, or scripts/setup.sh)",
                shim.display()
            );
        }
        Ok(())
    }
}

/// A running private containerd and everything it holds.
pub struct Containerd<'h> {
    host: &'h VmHost,
    /// Unique per instance: its ctr namespace and cgroup (`/sys/fs/cgroup/NAME`).
    name: String,
    /// Its directory where VMs run: `config.toml`, `root/`, `state/`,
    /// `containerd.sock`, `containerd.log`, `logs/` (CRI pod logs).
    dir: PathBuf,
    options: Options,
    /// containerd's process id where VMs run.
    pid: u32,
    stopped: bool,
    /// The CRI sandboxes it had made, learnt from its log at teardown.
    sandboxes: Vec<String>,
    /// The network namespaces of the pods made through
    /// [`Containerd::run_pod`] (paths), checked for leftovers.
    pod_netns: Mutex<Vec<String>>,
}

impl<'h> Containerd<'h> {
    /// Starts containerd where `host` runs VMs, waits until it answers and
    /// imports the test and pause images.
    pub fn start(host: &'h VmHost, options: Options) -> Result<Containerd<'h>> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        if !options.cri.is_file() {
            bail!("the CRI client {} is missing", options.cri.display());
        }
        let pause = pause_archive()?;
        let image = crate::artifact("busybox-oci.tar")?;
        let name = format!(
            "mcd{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        // Not /tmp: in the test host that is its overlay root, which
        // overlayfs refuses as an upper layer; /run is a tmpfs there.
        let dir = Path::new(BASE_DIR).join(&name);
        let mut cd = Containerd {
            host,
            name,
            dir,
            options,
            pid: 0,
            stopped: false,
            sandboxes: Vec::new(),
            pod_netns: Mutex::new(Vec::new()),
        };
        let config = match &cd.options.config {
            Some(text) => config::private(&cd.dir, text),
            None => config_toml(&cd.dir, cd.options.debug, cd.options.kata_config.as_deref()),
        };
        let mut vars = cd.vars();
        vars.extend([
            (
                "SHIM_PATH".into(),
                cd.options.shim_dir.display().to_string(),
            ),
            ("IMAGE_TAR".into(), image.display().to_string()),
            ("IMAGE_BASE".into(), config::IMAGE_BASE.into()),
            ("PAUSE_TAR".into(), pause.display().to_string()),
            ("PAUSE_BASE".into(), config::PAUSE_BASE.into()),
        ]);
        if cd.options.network {
            vars.push(("CNI_CONFLIST".into(), conflist(&cd.dir)));
        }
        vars.extend(cd.options.env.iter().cloned());
        let out = cd.script(&scripts::start(), &vars, config.as_bytes())?;
        let text = out.stdout_text();
        let pid = text
            .lines()
            .find_map(|l| l.strip_prefix("containerd pid "))
            .and_then(|p| p.trim().parse().ok());
        match pid {
            Some(pid) if out.status.success() => cd.pid = pid,
            _ => {
                // Drop tears down whatever did start.
                bail!(
                    "starting containerd in {} failed ({:?}{}): {}{}",
                    cd.dir.display(),
                    out.status,
                    if out.timed_out { ", timed out" } else { "" },
                    out.stderr_text(),
                    text
                );
            }
        }
        Ok(cd)
    }

    /// The instance's unique name: its ctr namespace and cgroup.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directory where VMs run.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The ctr namespace [`Containerd::ctr`] uses (CRI's is `k8s.io`).
    pub fn namespace(&self) -> &str {
        &self.name
    }

    /// containerd's process id where VMs run.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The name of containerd's network namespace (`/run/netns/NAME`) with
    /// [`Options::network`].
    pub fn netns(&self) -> Option<&str> {
        self.options.network.then_some(self.name.as_str())
    }

    /// A container id for `base` (ids are unique per namespace already; this
    /// keeps them recognisable across instances in one test host).
    pub fn id(&self, base: &str) -> String {
        format!("{}-{base}", self.name)
    }

    /// The cgroup parent for CRI pods: under the instance's cgroup.
    pub fn pod_cgroup_parent(&self) -> String {
        format!("/{}/pods", self.name)
    }

    /// `ctr -a SOCKET -n NAMESPACE ARGS…`, however it ends.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_in(&self.name, args, b"", TIMEOUT)
    }

    /// `ctr` in `namespace`, with `stdin`, killed after `timeout`.
    pub fn ctr_in(
        &self,
        namespace: &str,
        args: &[&str],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<Output> {
        let socket = self.socket().display().to_string();
        let mut argv = vec!["ctr", "-a", &socket, "-n", namespace];
        argv.extend_from_slice(args);
        self.host
            .run(&argv, stdin, timeout)
            .with_context(|| format!("running ctr {}", args.join(" ")))
    }

    /// `ctr ARGS…` that must succeed: its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() || out.timed_out {
            bail!(
                "ctr {} ended with {:?}{}: {}{}",
                args.join(" "),
                out.status,
                if out.timed_out { " (timed out)" } else { "" },
                out.stderr_text(),
                self.log_tail()
            );
        }
        Ok(out.stdout_text())
    }

    /// `cri --socket SOCKET ARGS…` (see `src/bin/cri/main.rs`), which must
    /// succeed: its JSON answer.
    pub fn cri(&self, args: &[&str]) -> Result<Value> {
        let out = self.cri_output(args)?;
        if !out.status.success() || out.timed_out {
            bail!(
                "cri {} ended with {:?}{}: {}{}",
                args.join(" "),
                out.status,
                if out.timed_out { " (timed out)" } else { "" },
                out.stderr_text().trim(),
                self.log_tail()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "cri {} printed no JSON: {}",
                args.join(" "),
                out.stdout_text()
            )
        })
    }

    /// `cri --socket SOCKET ARGS…`, however it ends.
    pub fn cri_output(&self, args: &[&str]) -> Result<Output> {
        let cri = self.options.cri.display().to_string();
        let socket = self.socket().display().to_string();
        let mut argv = vec![cri.as_str(), "--socket", &socket];
        argv.extend_from_slice(args);
        self.host
            .run(&argv, b"", TIMEOUT)
            .with_context(|| format!("running cri {}", args.join(" ")))
    }

    /// Runs a shell script where VMs run, with `D` (the instance's
    /// directory), `S` (its socket), `NS`, `CTR` (`ctr -a S -n NS`), `CRI`
    /// (`cri --socket S`) and `IMAGE` set, and with [`Options::network`]
    /// `NETNS` (containerd's network namespace's name) and `IN_NETNS`
    /// (`nsenter --net=/run/netns/$NETNS`, a command prefix; empty without).
    pub fn sh(&self, script: &str, stdin: &[u8], timeout: Duration) -> Result<Output> {
        let vars = self.sh_vars();
        self.script_with(script, &vars, stdin, timeout)
    }

    /// Runs a shell script like [`Containerd::sh`], but in containerd's
    /// network namespace (where the pods' bridge and gateway are), with the
    /// proxy variables unset (every address there is local). Fails without
    /// [`Options::network`].
    pub fn sh_in_netns(&self, script: &str, stdin: &[u8], timeout: Duration) -> Result<Output> {
        let Some(netns) = self.netns() else {
            bail!(
                "containerd {} has no network namespace (Options::network)",
                self.name
            );
        };
        let script = format!(
            "unset http_proxy https_proxy ftp_proxy all_proxy no_proxy \
             HTTP_PROXY HTTPS_PROXY FTP_PROXY ALL_PROXY NO_PROXY\n{script}"
        );
        let mut argv: Vec<String> = vec!["nsenter".into(), format!("--net=/run/netns/{netns}")];
        argv.push("env".into());
        argv.extend(self.sh_vars().iter().map(|(k, v)| format!("{k}={v}")));
        argv.extend(["sh".into(), "-c".into(), script]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.host.run(&argv, stdin, timeout)
    }

    /// [`Containerd::sh_in_netns`] that must succeed: its stdout.
    pub fn sh_in_netns_ok(&self, script: &str, timeout: Duration) -> Result<String> {
        let out = self.sh_in_netns(script, b"", timeout)?;
        if !out.status.success() || out.timed_out {
            bail!(
                "in containerd's netns, `{script}` ended with {:?}{}:\n{}{}",
                out.status,
                if out.timed_out { " (timed out)" } else { "" },
                out.stdout_text(),
                out.stderr_text()
            );
        }
        Ok(out.stdout_text())
    }

    /// The variables of [`Containerd::sh`].
    fn sh_vars(&self) -> Vec<(String, String)> {
        let socket = self.socket().display().to_string();
        let mut vars = self.vars();
        vars.extend([
            ("S".to_string(), socket.clone()),
            ("CTR".into(), format!("ctr -a {socket} -n {}", self.name)),
            (
                "CRI".into(),
                format!("{} --socket {socket}", self.options.cri.display()),
            ),
            ("IMAGE".into(), IMAGE.into()),
            (
                "IN_NETNS".into(),
                self.netns()
                    .map(|n| format!("nsenter --net=/run/netns/{n}"))
                    .unwrap_or_default(),
            ),
        ]);
        vars
    }

    /// A file's content where VMs run (a CRI log, say).
    pub fn read_file(&self, path: &str) -> Result<String> {
        let out = self.host.run(&["cat", path], b"", TIMEOUT)?;
        if !out.status.success() {
            bail!("cannot read {path}: {}", out.stderr_text());
        }
        Ok(out.stdout_text())
    }

    /// Where containerd logs (where VMs run).
    fn log_path(&self) -> String {
        self.dir.join("containerd.log").display().to_string()
    }

    /// containerd's whole log.
    pub fn log(&self) -> Result<String> {
        self.read_file(&self.log_path())
    }

    /// The last lines of containerd's log (with a heading), for error
    /// messages; empty when there is none.
    pub fn log_tail(&self) -> String {
        let log = self.log_path();
        match self.host.run(&["tail", "-n", "30", &log], b"", TIMEOUT) {
            Ok(out) if out.status.success() => {
                format!("\n--- the end of {log}:\n{}", out.stdout_text())
            }
            _ => String::new(),
        }
    }

    /// What of this instance is still there that should not be, one line
    /// each: tasks and containers in its namespaces; its processes (shims,
    /// VMMs and containers, found by their command line, environment, working
    /// directory or cgroup; containerd itself only once stopped); mounts
    /// under or over its directory or in our shim's pod directories; those
    /// directories ([`KATA_STATE_ROOT`]); container cgroups; runc state; and
    /// shim sockets in `/run/containerd/s` nobody listens on (any
    /// instance's). With [`Options::network`]: veths or `tap*_mvm` links in
    /// containerd's network namespace, addresses still reserved in its IPAM
    /// state, CNI's cached results of its sandboxes (`/var/lib/cni/results`),
    /// and the network namespaces of pods made with [`Containerd::run_pod`]
    /// (with any `tap*_mvm` link or ingress qdisc in them).
    /// After [`Containerd::stop`], also the directory and cgroups themselves,
    /// and containerd's network namespace.
    pub fn leftovers(&self) -> Result<Vec<String>> {
        let mut vars = self.vars();
        vars.push((
            "RUNNING".into(),
            if self.stopped { "0" } else { "1" }.into(),
        ));
        let out = self.script(&scripts::leftovers(), &vars, b"")?;
        if !out.status.success() || out.timed_out {
            bail!(
                "looking for leftovers failed ({:?}): {}",
                out.status,
                out.stderr_text()
            );
        }
        Ok(out
            .stdout_text()
            .lines()
            .filter_map(|l| l.strip_prefix("LEFTOVER "))
            .map(String::from)
            .collect())
    }

    /// Starts containerd for a test: shims get [`AGENT_TIMEOUT_SECS`] to
    /// reach their agent (TCG test hosts are slow), and a failure panics
    /// with containerd's reason.
    pub fn start_for_test(host: &'h VmHost, mut options: Options) -> Containerd<'h> {
        options
            .env
            .push(("MICROVM_AGENT_TIMEOUT".into(), AGENT_TIMEOUT_SECS.into()));
        match Containerd::start(host, options) {
            Ok(cd) => cd,
            Err(e) => panic!("containerd did not start: {e:#}"),
        }
    }

    /// Asserts that nothing of the instance's pods and containers is left,
    /// both while containerd still runs and after it stopped (and that
    /// stopping needed no force).
    pub fn assert_nothing_left(mut self) {
        let running = self.leftovers().expect("looking for leftovers");
        let log = if running.is_empty() {
            String::new()
        } else {
            self.log_tail()
        };
        let forced = self.stop().expect("stopping containerd");
        let stopped = self.leftovers().expect("looking for leftovers");
        assert!(
            running.is_empty() && forced.is_empty() && stopped.is_empty(),
            "left behind while containerd ran: {running:#?}\nforced at teardown: {forced:#?}\n\
             left after it stopped: {stopped:#?}{log}"
        );
    }

    /// Tears the instance down: removes every pod, task and container
    /// through containerd, stops it, then kills, unmounts and removes what
    /// is left of it. Returns the warnings (what needed force). Idempotent;
    /// Drop calls it.
    pub fn stop(&mut self) -> Result<Vec<String>> {
        if self.stopped {
            return Ok(Vec::new());
        }
        let vars = self.vars();
        let out = self.script(&scripts::stop(), &vars, b"")?;
        self.stopped = true;
        self.sandboxes = out
            .stdout_text()
            .lines()
            .filter_map(|l| l.strip_prefix("SANDBOX "))
            .map(String::from)
            .collect();
        if !out.status.success() || out.timed_out {
            bail!(
                "tearing containerd down failed ({:?}): {}{}",
                out.status,
                out.stderr_text(),
                out.stdout_text()
            );
        }
        Ok(out
            .stdout_text()
            .lines()
            .filter_map(|l| l.strip_prefix("WARNING: "))
            .map(String::from)
            .collect())
    }

    /// The variables every script gets (see `scripts.rs`).
    fn vars(&self) -> Vec<(String, String)> {
        let pod_netns = self
            .pod_netns
            .lock()
            .map(|v| v.join(" "))
            .unwrap_or_default();
        vec![
            ("NETNS".into(), self.netns().unwrap_or_default().into()),
            ("POD_NETNS".into(), pod_netns),
            ("D".into(), self.dir.display().to_string()),
            ("NAME".into(), self.name.clone()),
            ("NS".into(), self.name.clone()),
            ("CRI".into(), self.options.cri.display().to_string()),
            ("WAIT".into(), self.options.wait.as_secs().to_string()),
            ("SHIM_STATE".into(), KATA_STATE_ROOT.into()),
            ("SANDBOXES".into(), self.sandboxes.join(" ")),
        ]
    }

    fn script(&self, script: &str, vars: &[(String, String)], stdin: &[u8]) -> Result<Output> {
        self.script_with(script, vars, stdin, TIMEOUT)
    }

    /// `env VARS… sh -c SCRIPT` where VMs run.
    fn script_with(
        &self,
        script: &str,
        vars: &[(String, String)],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<Output> {
        let mut argv: Vec<String> = vec!["env".into()];
        argv.extend(vars.iter().map(|(k, v)| format!("{k}={v}")));
        argv.extend(["sh".into(), "-c".into(), script.into()]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.host.run(&argv, stdin, timeout)
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        match self.stop() {
            Ok(warnings) if !warnings.is_empty() => {
                eprintln!(
                    "containerd {}: teardown: {}",
                    self.name,
                    warnings.join("; ")
                )
            }
            Ok(_) => {}
            Err(e) => eprintln!("containerd {}: {e:#}", self.name),
        }
    }
}

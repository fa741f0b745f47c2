//! `microvm`: run a command in a container in a throwaway microVM.
//!
//! ```text
//! microvm run [--cpus N] [--memory MIB] [--kernel PATH] [--initrd PATH]
//!             [--console FILE|-] [--kernel-cmdline EXTRA] [--seccomp on|off]
//!             [--rootfs DIR | --image PATH] [-e KEY=VALUE]... [-w DIR] [-u UID[:GID]] [-t]
//!             [--read-only] [--hostname NAME] [--guest [--share HOSTDIR]]
//!             [--net [--net-subnet CIDR]] -- CMD [ARGS...]
//! microvm run [VM options] --bundle DIR
//! ```
//! Starts a VM, runs CMD in a container (on the default busybox rootfs,
//! `--rootfs DIR`, or `--image` — an OCI layout, OCI archive or
//! docker-archive, unpacked and cached, its Entrypoint/Cmd/Env/WorkingDir/
//! User applied under the flags) with this terminal's or pipe's stdin, streams its output,
//! forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to it, and exits with its exit
//! code (128+N when signal N killed it, 127 when it could not be run). The
//! VM is gone when `microvm` returns, whichever way it ends. `--guest` runs
//! CMD directly in the guest (its initramfs), without a container;
//! `--share HOSTDIR` then shows HOSTDIR to it over virtio-fs, tag `microvm`.
//! `--bundle DIR` runs an OCI bundle as `runc run` would: DIR/config.json
//! decides everything, its rootfs is shared into the VM.
//! `--agent-socket PATH` drives an agent already serving on a Unix socket
//! instead of booting a VM (for working on the agent itself).
//! `--net` (root) gives the VM a NIC: eth0 `10.201.N.2/30`, default route via
//! `10.201.N.1` on the host link `mvh<pid>` (N: the first free /30 of
//! 10.201.0.0/16, or of `--net-subnet CIDR`), the host's /etc/resolv.conf
//! read-only in the container. Outbound NAT is left to the user (see
//! [`runtime::network::standalone::NAT_HINT`]). All of it is gone when
//! `microvm` exits.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use runtime::config::{SandboxConfig, SharedBind};
use runtime::guest_command::{self, ContainerLaunch, GuestCommand, Launch, Outcome};
use runtime::network::standalone::{StandaloneNetwork, Subnet};
use runtime::oci::{self, ContainerOptions};
use runtime::sandbox::{Sandbox, GUEST_SHARED_DIR, SHARED_FS_TAG};

const USAGE: &str = "usage: microvm run [--cpus N] [--memory MIB] [--kernel PATH] [--initrd PATH] \
[--console FILE|-] [--kernel-cmdline EXTRA] [--seccomp on|off] [--rootfs DIR | --image PATH] [-e KEY=VALUE]... [-w DIR] \
[-u UID[:GID]] [-t] [--read-only] [--hostname NAME] [--guest [--share HOSTDIR]] \
[--net [--net-subnet CIDR]] -- CMD [ARGS...]
       microvm run [VM options] --bundle DIR
       microvm ctl ... (see microvm ctl --help)
       microvm install [--bin-dir DIR] [--share-dir DIR] [--config FILE] [--containerd-config FILE]

--net (root): the VM gets eth0 10.201.N.2/30 with a default route via 10.201.N.1, the host end
  mvh<pid> of a veth pair (N: the first /30 of 10.201.0.0/16 without a local address, or of
  --net-subnet CIDR); the container sees the host's /etc/resolv.conf. The host is reachable at
  10.201.N.1; for anything beyond it, enable forwarding and NAT yourself:
    sysctl -w net.ipv4.ip_forward=1
    iptables -t nat -A POSTROUTING -s 10.201.0.0/16 ! -o mvh+ -j MASQUERADE";

struct RunOptions {
    config: SandboxConfig,
    container: ContainerOptions,
    rootfs: Option<PathBuf>,
    /// An OCI image (layout directory, OCI archive or docker-archive).
    image: Option<PathBuf>,
    /// `-u` as given: UID[:GID] or a user name of the rootfs.
    user: Option<String>,
    /// An OCI bundle: its config.json replaces every container option.
    bundle: Option<PathBuf>,
    /// Run in the guest itself, not in a container.
    guest: bool,
    agent_socket: Option<PathBuf>,
    /// `--net`: a NIC on a veth pair to this host (and `--net-subnet`).
    net: Option<Option<Subnet>>,
}

/// The VM options `run` and `ctl` share.
#[derive(Default)]
struct VmFlags {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cpus: Option<u8>,
    memory: Option<u32>,
    console: Option<PathBuf>,
    extra_cmdline: String,
    seccomp: Option<runtime::config::Seccomp>,
}

impl VmFlags {
    /// Takes `flag` (reading its value with `value`) if it is a VM option.
    fn take(&mut self, flag: &str, value: impl FnOnce() -> Result<String>) -> Result<bool> {
        match flag {
            "--kernel" => self.kernel = Some(PathBuf::from(value()?)),
            "--initrd" => self.initrd = Some(PathBuf::from(value()?)),
            "--cpus" => {
                let text = value()?;
                let cpus = text
                    .parse()
                    .with_context(|| format!("--cpus {text}: give a number of vCPUs"))?;
                self.cpus = Some(cpus);
            }
            "--memory" => {
                let text = value()?;
                let mib = text
                    .parse()
                    .with_context(|| format!("--memory {text}: give the guest's memory in MiB"))?;
                self.memory = Some(mib);
            }
            "--console" => self.console = Some(PathBuf::from(value()?)),
            "--kernel-cmdline" => self.extra_cmdline = value()?,
            "--seccomp" => {
                let text = value()?;
                self.seccomp = Some(text.parse().map_err(anyhow::Error::msg)?);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn into_config(self) -> Result<SandboxConfig> {
        let mut config = SandboxConfig::with_defaults(self.kernel, self.initrd)?;
        if let Some(cpus) = self.cpus {
            config.cpus = cpus;
        }
        if let Some(memory) = self.memory {
            config.memory_mib = memory;
        }
        config.console = self.console.map(|path| {
            if path.as_os_str() == "-" {
                PathBuf::from("stdout")
            } else {
                path
            }
        });
        config.extra_cmdline = self.extra_cmdline;
        if let Some(seccomp) = self.seccomp {
            config.seccomp = seccomp;
        }
        Ok(config)
    }
}

/// `-u` against the rootfs: numeric UID[:GID], or a name from its /etc/passwd.
fn resolve_user(rootfs: Option<&PathBuf>, value: &str) -> Result<(u32, u32, Vec<u32>)> {
    if let Ok((uid, gid)) = parse_user(value) {
        return Ok((uid, gid, Vec::new()));
    }
    let rootfs = rootfs.with_context(|| format!("-u {value}: give a numeric UID[:GID]"))?;
    let user = rootfs_builder::image::resolve_user(rootfs, value)
        .with_context(|| format!("-u {value}"))?;
    Ok((user.uid, user.gid, user.additional_gids))
}

fn parse_user(value: &str) -> Result<(u32, u32)> {
    let (uid, gid) = value.split_once(':').unwrap_or((value, ""));
    let uid = uid
        .parse()
        .with_context(|| format!("-u {value}: give a numeric UID[:GID]"))?;
    let gid = if gid.is_empty() {
        uid
    } else {
        gid.parse()
            .with_context(|| format!("-u {value}: give a numeric UID[:GID]"))?
    };
    Ok((uid, gid))
}

/// `microvm run`'s options; `None` when `-h`/`--help` came before the
/// command.
fn parse_run(args: &[String]) -> Result<Option<RunOptions>> {
    let mut vm = VmFlags::default();
    let mut container = ContainerOptions {
        hostname: "microvm".into(),
        ..Default::default()
    };
    let mut rootfs = None;
    let mut image = None;
    let mut user = None;
    let mut bundle = None;
    let mut guest = false;
    let mut agent_socket = None;
    let mut share = None;
    let mut net = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = || {
            iter.next()
                .cloned()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        if vm.take(arg, &mut value)? {
            continue;
        }
        match arg.as_str() {
            "--rootfs" => rootfs = Some(PathBuf::from(value()?)),
            "--image" => image = Some(PathBuf::from(value()?)),
            "--bundle" => bundle = Some(PathBuf::from(value()?)),
            "-e" | "--env" => {
                let entry = value()?;
                if !entry.contains('=') {
                    bail!("-e {entry}: give KEY=VALUE");
                }
                container.env.push(entry.clone());
            }
            "-w" | "--workdir" => {
                let dir = value()?;
                if !dir.starts_with('/') {
                    bail!("-w {dir}: the working directory must be absolute");
                }
                container.cwd = Some(dir.clone());
            }
            "-u" | "--user" => user = Some(value()?),
            "-t" | "--tty" => container.terminal = true,
            "--read-only" => container.read_only = true,
            "--hostname" => container.hostname = value()?.clone(),
            "-h" | "--help" => return Ok(None),
            "--guest" => guest = true,
            "--agent-socket" => agent_socket = Some(PathBuf::from(value()?)),
            "--share" => share = Some(PathBuf::from(value()?)),
            "--net" => net = Some(net.flatten()),
            "--net-subnet" => {
                let subnet: Subnet = value()?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--net-subnet {e}"))?;
                net = Some(Some(subnet));
            }
            "--" => {
                container.args = iter.cloned().collect();
                break;
            }
            other if !other.starts_with('-') => {
                container.args = std::iter::once(other.to_string())
                    .chain(iter.cloned())
                    .collect();
                break;
            }
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    if container.args.is_empty() && bundle.is_none() && image.is_none() {
        bail!("no command given\n{USAGE}");
    }
    if bundle.is_some()
        && (rootfs.is_some() || image.is_some() || guest || !container.args.is_empty())
    {
        bail!("--bundle takes everything from DIR/config.json: give no command, --rootfs, --image or --guest");
    }
    if rootfs.is_some() && image.is_some() {
        bail!("give --rootfs or --image, not both");
    }
    if let Some(rootfs) = &rootfs {
        if !rootfs.is_dir() {
            bail!("--rootfs {}: no such directory", rootfs.display());
        }
    }
    if let Some(bundle) = &bundle {
        if !bundle.is_dir() {
            bail!("--bundle {}: no such directory", bundle.display());
        }
    }
    if let Some(share) = &share {
        if !share.is_dir() {
            bail!("--share {}: no such directory", share.display());
        }
        // Until the agent mounts it into containers, the share is the guest's.
        if !guest {
            bail!("--share needs --guest (mount it there: mount -t virtiofs {SHARED_FS_TAG} /mnt)");
        }
    }
    if net.is_some() && agent_socket.is_some() {
        bail!("--net needs a VM: it does not go with --agent-socket");
    }
    let mut config = vm.into_config()?;
    config.shared_dir = share;
    Ok(Some(RunOptions {
        config,
        container,
        rootfs,
        image,
        user,
        bundle,
        guest,
        agent_socket,
        net,
    }))
}

/// An OCI bundle's spec and the host path of its rootfs.
fn load_bundle(dir: &std::path::Path) -> Result<(oci_spec::runtime::Spec, PathBuf)> {
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    let spec: oci_spec::runtime::Spec = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid OCI runtime spec", config.display()))?;
    let root = spec
        .root()
        .as_ref()
        .with_context(|| format!("{} has no root", config.display()))?;
    let rootfs = dir.join(root.path());
    if !rootfs.is_dir() {
        bail!(
            "the bundle's rootfs {} is not a directory",
            rootfs.display()
        );
    }
    Ok((spec, rootfs))
}

/// What to run: a guest command, or a container on `rootfs` whose bundle is
/// `bundle` in the share (or, with an agent on a socket, at host paths).
fn launch(options: &RunOptions, rootfs: Option<&PathBuf>) -> Result<Launch> {
    if options.guest {
        return Ok(Launch::Guest(GuestCommand {
            argv: options.container.args.clone(),
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            cwd: "/".into(),
        }));
    }
    let id = format!("run-{}", std::process::id());
    let (root, bundle, tag) = match rootfs {
        // An agent on this machine sees the rootfs where it is.
        Some(path) => (path.display().to_string(), "/".to_string(), String::new()),
        None => ("rootfs".into(), id.clone(), SHARED_FS_TAG.to_string()),
    };
    let spec = match &options.bundle {
        Some(dir) => {
            let (mut spec, _) = load_bundle(dir)?;
            let mut spec_root = spec.root().clone().unwrap_or_default();
            spec_root.set_path(root.into());
            spec.set_root(Some(spec_root));
            spec
        }
        None => oci::container_spec(&options.container, &root),
    };
    Ok(Launch::Container(Box::new(ContainerLaunch {
        spec,
        id,
        bundle,
        shared_fs_tag: tag,
    })))
}

fn report(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Exited(status) => status,
        Outcome::CannotRun { code, message } => {
            eprintln!("microvm: {message}");
            code
        }
    }
}

/// The image's rootfs (unpacked and cached), with its config applied to
/// the container options under the user's flags, as `docker run` does.
fn apply_image(options: &mut RunOptions, image: &std::path::Path) -> Result<PathBuf> {
    use rootfs_builder::image::{prepare, Overrides};
    let prepared = prepare(image, None, None)
        .with_context(|| format!("preparing image {}", image.display()))?;
    let overrides = Overrides {
        args: options.container.args.clone(),
        env: options.container.env.clone(),
        working_dir: options.container.cwd.clone(),
        user: options.user.clone(),
        ..Default::default()
    };
    let process = prepared
        .config
        .process(&overrides)
        .with_context(|| format!("image {}", image.display()))?;
    if process.args.is_empty() {
        bail!(
            "image {} sets no Entrypoint or Cmd: give a command",
            image.display()
        );
    }
    options.container.args = process.args;
    options.container.env = process.env;
    options.container.cwd = Some(process.cwd);
    options.user = (!process.user.is_empty()).then_some(process.user);
    Ok(prepared.rootfs)
}

fn run(mut options: RunOptions) -> Result<u8> {
    // The rootfs, and whether it is shared with others (then the container
    // writes to a layer over it).
    let (rootfs, copy_on_write) = match (&options.rootfs, options.guest, &options.bundle) {
        (_, true, _) => (None, false),
        (_, _, Some(dir)) => (Some(load_bundle(dir)?.1), false),
        (Some(rootfs), false, None) => (Some(rootfs.clone()), false),
        (None, false, None) => match options.image.clone() {
            Some(image) => (Some(apply_image(&mut options, &image)?), true),
            None => (Some(runtime::config::default_rootfs()?), true),
        },
    };
    if let Some(user) = &options.user {
        (
            options.container.uid,
            options.container.gid,
            options.container.additional_gids,
        ) = resolve_user(rootfs.as_ref(), user)?;
    }
    if let Some(socket) = &options.agent_socket {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to the agent at {}", socket.display()))?;
        let launch = launch(&options, rootfs.as_ref())?;
        return Ok(report(guest_command::run_on_agent(stream, &launch)?));
    }
    let mut launch = launch(&options, None)?;
    if let (Some(rootfs), Launch::Container(container)) = (&rootfs, &launch) {
        options.config.shared_binds.push(SharedBind {
            source: rootfs.clone(),
            target: PathBuf::from(&container.bundle).join("rootfs"),
            copy_on_write,
        });
    }
    // Declared before the sandbox, so dropped after it: the host link goes
    // once the VMM (and its taps) are gone, on every way out.
    let mut network = match options.net {
        Some(subnet) => {
            Some(StandaloneNetwork::create(subnet).context("setting up the VM's network (--net)")?)
        }
        None => None,
    };
    if let Some(network) = &mut network {
        options.config.net = network.pod().take_attachments().into();
        if options.bundle.is_none() {
            if let Launch::Container(container) = &mut launch {
                share_resolv_conf(&mut options.config, container);
            }
        }
    }
    // From here on a SIGTERM goes to the command (once it runs) and the
    // VM is torn down as usual, whenever it came.
    let signals = guest_command::catch_signals(launch.terminal())?;
    let mut sandbox = Sandbox::start(&options.config)?;
    let stream = sandbox.connect_agent(options.config.agent_timeout)?;
    let outcome = guest_command::run_with_network(
        stream,
        &launch,
        &mut sandbox,
        network.as_mut().map(|n| &*n.pod()),
        signals,
    );
    let code = match outcome {
        Ok(outcome) => report(outcome),
        // Dropping the sandbox kills the stuck VM; its death would say
        // less than why.
        Err(e) if e.is::<guest_command::GuestStuck>() => return Err(e),
        // The agent answered: the VM is alive, its error is the story.
        Err(e) if e.is::<guest_command::AgentRefused>() => return Err(e),
        Err(e) => {
            // The VM's death explains a broken agent connection best.
            match sandbox.death_within(std::time::Duration::from_secs(2)) {
                Some(death) => bail!("{death}"),
                None => return Err(e),
            }
        }
    };
    sandbox.stop(std::time::Duration::from_secs(5));
    if let Some(mut network) = network {
        network.close();
    }
    Ok(code)
}

/// The host's /etc/resolv.conf, read-only on the container's (through the
/// share), as Docker does for a container on a host network.
fn share_resolv_conf(config: &mut SandboxConfig, container: &mut ContainerLaunch) {
    const RESOLV_CONF: &str = "/etc/resolv.conf";
    if !std::path::Path::new(RESOLV_CONF).is_file() {
        tracing::info!("no {RESOLV_CONF} on this host to give the container");
        return;
    }
    let target = PathBuf::from(&container.bundle).join("resolv.conf");
    config.shared_binds.push(SharedBind {
        source: PathBuf::from(RESOLV_CONF),
        target: target.clone(),
        copy_on_write: false,
    });
    let mount = oci_spec::runtime::MountBuilder::default()
        .destination(RESOLV_CONF)
        .typ("bind")
        .source(PathBuf::from(GUEST_SHARED_DIR).join(&target))
        .options(
            ["rbind", "ro", "nosuid", "nodev", "noexec"]
                .map(String::from)
                .to_vec(),
        )
        .build();
    match mount {
        Ok(mount) => {
            let mut mounts = container.spec.mounts().clone().unwrap_or_default();
            mounts.retain(|m| m.destination() != std::path::Path::new(RESOLV_CONF));
            mounts.push(mount);
            container.spec.set_mounts(Some(mounts));
        }
        Err(e) => tracing::warn!("not sharing {RESOLV_CONF}: {}", protocols::error_chain(&e)),
    }
}

const CTL_USAGE: &str =
    "usage: microvm ctl [--cpus N] [--memory MIB] [--kernel PATH] [--initrd PATH] \
[--console FILE|-] [--container ID[=ROOTFS]]... < SCRIPT   (commands: see runtime/src/ctl.rs)";

/// `microvm ctl`: one VM with the named containers' rootfs shared, driven
/// by the script on stdin.
fn ctl(args: &[String]) -> Result<u8> {
    let mut vm = VmFlags::default();
    let mut binds = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = || {
            iter.next()
                .cloned()
                .with_context(|| format!("{arg} needs a value\n{CTL_USAGE}"))
        };
        if vm.take(arg, &mut value)? {
            continue;
        }
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{CTL_USAGE}");
                return Ok(0);
            }
            "--container" => {
                let spec = value()?;
                let (id, rootfs) = match spec.split_once('=') {
                    Some((id, rootfs)) => (id.to_string(), PathBuf::from(rootfs)),
                    None => (spec.clone(), runtime::config::default_rootfs()?),
                };
                if !rootfs.is_dir() {
                    bail!(
                        "--container {spec}: {} is not a directory",
                        rootfs.display()
                    );
                }
                binds.push(SharedBind {
                    source: rootfs,
                    target: PathBuf::from(id).join("rootfs"),
                    copy_on_write: true,
                });
            }
            other => bail!("unknown option {other}\n{CTL_USAGE}"),
        }
    }
    let mut config = vm.into_config()?;
    config.shared_binds = binds;
    let mut sandbox = Sandbox::start(&config)?;
    let stream = sandbox.connect_agent(config.agent_timeout)?;
    let client = protocols::agent_ttrpc::AgentServiceClient::new(
        protocols::client_from_stream(stream)
            .map_err(|e| anyhow::anyhow!("agent connection: {e}"))?,
    );
    let mut ctl = runtime::ctl::Ctl::new(client);
    ctl.create_sandbox(SHARED_FS_TAG)?;
    let result = ctl.run_script(std::io::stdin().lock(), &mut std::io::stdout().lock());
    if ctl.shutdown() {
        sandbox.guest_quiesced();
    }
    sandbox.stop(std::time::Duration::from_secs(5));
    result.map(|()| 0)
}

const INSTALL_USAGE: &str = "usage: microvm install [--bin-dir DIR (/usr/local/bin)] \
[--share-dir DIR (/usr/share/microvm)] [--config FILE (/etc/microvm/configuration.toml)] \
[--containerd-config FILE (add the kata runtime, and runc if missing, to it)]";

/// `microvm install`: binaries on PATH, guest assets, configuration file,
/// and containerd's runtime stanza (printed, or appended to its config).
fn install(args: &[String]) -> anyhow::Result<u8> {
    let mut paths = runtime::install::InstallPaths::default();
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{INSTALL_USAGE}");
            return Ok(0);
        }
        let value = args
            .next()
            .map(PathBuf::from)
            .with_context(|| format!("{flag} needs a value\n{INSTALL_USAGE}"))?;
        match flag.as_str() {
            "--bin-dir" => paths.bin_dir = value,
            "--share-dir" => paths.share_dir = value,
            "--config" => paths.config_file = value,
            "--containerd-config" => paths.containerd_config = Some(value),
            _ => anyhow::bail!("unknown option {flag}\n{INSTALL_USAGE}"),
        }
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let from = exe.parent().context("this program's directory")?;
    let report = runtime::install::install(from, &paths)?;
    for path in &report.copied {
        println!("installed {}", path.display());
    }
    if report.config_kept {
        println!("kept the existing {}", paths.config_file.display());
    } else {
        println!("wrote {}", paths.config_file.display());
    }
    use runtime::install::containerd::Edit;
    match (&paths.containerd_config, &report.containerd_edit) {
        (Some(file), Some(Edit::Updated { added_runc, backup })) => {
            println!(
                "added runtime kata{} to {} (restart containerd to use it)",
                if *added_runc {
                    " and containerd's default runtime runc (declaring a runtime replaces containerd's built-in table)"
                } else {
                    ""
                },
                file.display()
            );
            if let Some(backup) = backup {
                println!("its previous text is in {}", backup.display());
            }
        }
        (Some(file), _) => println!("{} has runtime kata already: not changed", file.display()),
        (None, _) => println!(
            "\ncontainerd runs microvm as runtime kata with these tables in its configuration \
             (/etc/containerd/config.toml), which must be version 2 (`version = 2`).\n\
             Declaring any runtime replaces containerd's built-in runtime table, so runc, CRI's \
             default runtime, is declared too: leave its table out only if the file declares \
             runc already. Then restart containerd. `microvm install --containerd-config FILE` \
             does all this.\n\n{}",
            report.stanza
        ),
    }
    Ok(0)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // ttrpc logs each call a dead VM broke; the run's own error
            // says what happened.
            tracing_subscriber::EnvFilter::try_from_env("MICROVM_LOG")
                .unwrap_or_else(|_| "warn,ttrpc=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => match parse_run(&args[1..]) {
            Ok(Some(options)) => run(options),
            Ok(None) => {
                println!("{USAGE}");
                Ok(0)
            }
            Err(e) => Err(e),
        },
        Some("ctl") => ctl(&args[1..]),
        Some("install") => install(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(0)
        }
        _ => Err(anyhow::anyhow!("{USAGE}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // As `{:#}` would, but a cause that an error from outside the
            // workspace prints in its message too is shown once.
            eprintln!("microvm: {}", protocols::error_chain(&*e));
            ExitCode::from(1)
        }
    }
}

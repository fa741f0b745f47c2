//! `cri`: a CRI client for the containerd tests, like crictl but printing
//! every answer as one JSON document on stdout (enum states by name, byte
//! strings as text), so tests can parse it; except `exec`, whose stdio is
//! the command's (see `exec.rs`). See [`USAGE`].

mod args;
mod config;
mod exec;
mod spdy;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{self as cri, ContainerState, PodSandboxState};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint, Uri};

use args::Args;

const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

/// The commands, printed by `cri --help` and with a missing command.
const USAGE: &str = r#"usage: cri [--socket PATH] [--timeout SECS] COMMAND ...
  version | info                      RuntimeService Version / Status
  runp POD_OPTIONS [--handler H]      RunPodSandbox -> {"pod_id"}
  inspectp [--verbose] POD            PodSandboxStatus (the pod IP is
                                      status.network.ip; --verbose adds
                                      containerd's info, its JSON decoded)
  create POD POD_OPTIONS CONTAINER_OPTIONS [-- CMD...] -> {"container_id"}
  start | rm ID                       StartContainer / RemoveContainer
  stop [--grace SECS] ID              StopContainer
  status [--verbose] ID               ContainerStatus
  wait [--state S] [--for SECS] ID    polls ContainerStatus until S (EXITED)
  exec-sync [--for SECS] ID -- CMD... ExecSync -> {"exit_code","stdout","stderr"}
  exec [--tty] [--stdin FILE|-] [--verbose] ID -- CMD...
                                      Exec, streamed (SPDY, like crictl exec
                                      -i): CMD's stdout and stderr are cri's,
                                      byte for byte (no JSON); FILE (- for
                                      cri's stdin) is CMD's stdin, which then
                                      ends (EOF); cri exits with CMD's exit
                                      status, 125 when cri itself fails, 126
                                      when the exec fails without a status;
                                      --verbose: a JSON summary on stderr;
                                      --timeout bounds the whole session.
                                      containerd 1.6 may never finish an
                                      exec whose CMD leaves stdin unread
                                      (then --timeout: 125); with --tty, the
                                      end of stdin ends CMD's output there
  stats ID                            ContainerStats
  stopp | rmp POD                     StopPodSandbox / RemovePodSandbox
  pods | ps [--pod POD] | images      listings -> {"items": [...]}
  up POD_OPTIONS [--handler H] CONTAINER_OPTIONS [-- CMD...]
                                      runp + create + start until running,
                                      with each step's milliseconds
  rm-all                              stops and removes every pod and container

POD_OPTIONS: --pod-name N [--pod-namespace NS] [--pod-uid U] [--attempt N]
  [--log-dir D] [--cgroup-parent P] [--hostname H] [--pod-network]
  [--dns-server IP]... [--dns-search DOMAIN]... [--dns-option OPT]...
  [--pod-label K=V]... [--pod-annotation K=V]... [--pod-privileged]
CONTAINER_OPTIONS: --name N --image I [--arg A]... [--env K=V]... [--workdir D]
  [--label K=V]... [--annotation K=V]... [--log-path P] [--tty] [--stdin]
  [--privileged] [--memory BYTES] [--cpu-quota N --cpu-period N]
  [--mount HOST:CTR[:ro]]...

The socket defaults to $CONTAINERD_ADDRESS, else /run/containerd/containerd.sock.
Every answer carries elapsed_ms, the time the command's calls took. Errors go
to stderr with exit status 1 (exec: 125)."#;

/// How a command ends: a JSON answer, or (exec) an exit status.
enum Done {
    Answer(Value),
    Exit(i32),
}

fn main() {
    let words: Vec<String> = std::env::args().skip(1).collect();
    match run(&words) {
        Ok(Done::Answer(answer)) => println!("{answer}"),
        Ok(Done::Exit(code)) => {
            let _ = std::io::Write::flush(&mut std::io::stdout());
            std::process::exit(code);
        }
        Err(e) => {
            eprintln!("cri: {}", protocols::error_chain(&*e));
            std::process::exit(1);
        }
    }
}

fn run(words: &[String]) -> Result<Done> {
    let mut args = Args::parse(words)?;
    if args.switch("help") || words.first().map(String::as_str) == Some("help") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    let socket = PathBuf::from(
        args.value("socket")
            .or_else(|| std::env::var("CONTAINERD_ADDRESS").ok())
            .unwrap_or_else(|| DEFAULT_SOCKET.into()),
    );
    let timeout = Duration::from_secs(args.number("timeout", 300)?);
    let name = args
        .positional("a command")
        .map_err(|e| anyhow!("{e}\n{USAGE}"))?;
    if name == "exec" {
        return Ok(Done::Exit(exec::main(&socket, timeout, args)));
    }
    let command = Command::parse(&name, args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let channel = connect(&socket).await?;
        let mut client = Client {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        };
        let started = Instant::now();
        let work = client.execute(command);
        let mut answer = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| anyhow!("{name} took longer than {timeout:?}"))?
            .with_context(|| name.clone())?;
        if let Value::Object(fields) = &mut answer {
            fields.entry("elapsed_ms").or_insert(json!(millis(started)));
        }
        Ok(Done::Answer(answer))
    })
}

/// A channel to containerd's gRPC socket (the URI is a placeholder).
async fn connect(socket: &std::path::Path) -> Result<Channel> {
    let path = socket.to_path_buf();
    Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// A gRPC error as one line: its code and message.
fn status(e: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", e.code(), e.message())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).context("encoding the answer as JSON")
}

/// Replaces a numeric container state with its name.
fn name_container_state(state: &mut Value) {
    if let Some(n) = state.as_i64() {
        if let Ok(s) = ContainerState::try_from(n as i32) {
            *state = json!(s.as_str_name());
        }
    }
}

/// Decodes the values of a verbose answer's `info` map that are JSON text
/// (containerd's `info`: the sandbox's runtime spec, CNI result, …).
fn decode_info(info: &mut Value) {
    if let Value::Object(fields) = info {
        for value in fields.values_mut() {
            if let Some(decoded) = value.as_str().and_then(|t| serde_json::from_str(t).ok()) {
                *value = decoded;
            }
        }
    }
}

/// Replaces a numeric pod state with its name.
fn name_pod_state(state: &mut Value) {
    if let Some(n) = state.as_i64() {
        if let Ok(s) = PodSandboxState::try_from(n as i32) {
            *state = json!(s.as_str_name());
        }
    }
}

/// A container state name (`RUNNING` or `CONTAINER_RUNNING`) as the enum.
fn parse_container_state(name: &str) -> Result<ContainerState> {
    let full = if name.starts_with("CONTAINER_") {
        name.to_uppercase()
    } else {
        format!("CONTAINER_{}", name.to_uppercase())
    };
    ContainerState::from_str_name(&full).with_context(|| format!("no container state {name:?}"))
}

struct Client {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// One parsed command line.
enum Command {
    Version,
    Info,
    RunPod(cri::PodSandboxConfig, String),
    InspectPod(String, bool),
    Create(String, cri::PodSandboxConfig, cri::ContainerConfig),
    Start(String),
    Stop(String, i64),
    Remove(String),
    Status(String, bool),
    Wait(String, ContainerState, Duration),
    ExecSync(String, Vec<String>, i64),
    Stats(String),
    StopPod(String),
    RemovePod(String),
    Pods,
    Containers(String),
    Images,
    Up(cri::PodSandboxConfig, String, cri::ContainerConfig),
    RemoveAll,
}

impl Command {
    /// Reads `command`'s arguments; anything left unread is an error.
    fn parse(command: &str, mut args: Args) -> Result<Command> {
        let parsed = match command {
            "version" => Command::Version,
            "info" => Command::Info,
            "runp" => {
                let config = config::pod_config(&mut args)?;
                Command::RunPod(config, args.value("handler").unwrap_or_default())
            }
            "inspectp" => {
                let verbose = args.switch("verbose");
                Command::InspectPod(args.positional("a pod id")?, verbose)
            }
            "create" => {
                let pod = args.positional("a pod id")?;
                let pod_config = config::pod_config(&mut args)?;
                Command::Create(pod, pod_config, config::container_config(&mut args)?)
            }
            "start" => Command::Start(args.positional("a container id")?),
            "stop" => {
                let grace = args.number("grace", 10)?;
                Command::Stop(args.positional("a container id")?, grace)
            }
            "rm" => Command::Remove(args.positional("a container id")?),
            "status" => {
                let verbose = args.switch("verbose");
                Command::Status(args.positional("a container id")?, verbose)
            }
            "wait" => {
                let state =
                    parse_container_state(&args.value("state").unwrap_or_else(|| "EXITED".into()))?;
                let limit = Duration::from_secs(args.number("for", 300)?);
                Command::Wait(args.positional("a container id")?, state, limit)
            }
            "exec-sync" => {
                let seconds = args.number("for", 0)?;
                let id = args.positional("a container id")?;
                let cmd = std::mem::take(&mut args.command);
                if cmd.is_empty() {
                    bail!("exec-sync needs a command after --");
                }
                Command::ExecSync(id, cmd, seconds)
            }
            "stats" => Command::Stats(args.positional("a container id")?),
            "stopp" => Command::StopPod(args.positional("a pod id")?),
            "rmp" => Command::RemovePod(args.positional("a pod id")?),
            "pods" => Command::Pods,
            "ps" => Command::Containers(args.value("pod").unwrap_or_default()),
            "images" => Command::Images,
            "up" => {
                let pod_config = config::pod_config(&mut args)?;
                let handler = args.value("handler").unwrap_or_default();
                Command::Up(pod_config, handler, config::container_config(&mut args)?)
            }
            "rm-all" => Command::RemoveAll,
            other => bail!("unknown command {other:?}"),
        };
        if !args.command.is_empty() {
            bail!("{command} takes no command line after --");
        }
        args.finish()?;
        Ok(parsed)
    }
}

impl Client {
    async fn execute(&mut self, command: Command) -> Result<Value> {
        Ok(match command {
            Command::Version => {
                let r = self
                    .runtime
                    .version(cri::VersionRequest::default())
                    .await
                    .map_err(status)?;
                to_json(r.get_ref())?
            }
            Command::Info => {
                let r = self
                    .runtime
                    .status(cri::StatusRequest { verbose: true })
                    .await
                    .map_err(status)?;
                to_json(r.get_ref())?
            }
            Command::RunPod(config, handler) => {
                json!({ "pod_id": self.run_pod(config, handler).await? })
            }
            Command::InspectPod(id, verbose) => {
                let r = self
                    .runtime
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: id,
                        verbose,
                    })
                    .await
                    .map_err(status)?;
                let mut answer = to_json(r.get_ref())?;
                name_pod_state(&mut answer["status"]["state"]);
                decode_info(&mut answer["info"]);
                answer
            }
            Command::Create(pod, pod_config, config) => {
                json!({ "container_id": self.create(pod, pod_config, config).await? })
            }
            Command::Start(id) => {
                self.start(id).await?;
                json!({})
            }
            Command::Stop(id, grace) => {
                self.runtime
                    .stop_container(cri::StopContainerRequest {
                        container_id: id,
                        timeout: grace,
                    })
                    .await
                    .map_err(status)?;
                json!({})
            }
            Command::Remove(id) => {
                self.remove_container(id).await?;
                json!({})
            }
            Command::Status(id, verbose) => self.container_status(id, verbose).await?,
            Command::Wait(id, state, limit) => self.wait_for(&id, state, limit).await?,
            Command::ExecSync(id, cmd, seconds) => {
                let r = self
                    .runtime
                    .exec_sync(cri::ExecSyncRequest {
                        container_id: id,
                        cmd,
                        timeout: seconds,
                    })
                    .await
                    .map_err(status)?;
                let r = r.get_ref();
                json!({
                    "exit_code": r.exit_code,
                    "stdout": String::from_utf8_lossy(&r.stdout),
                    "stderr": String::from_utf8_lossy(&r.stderr),
                })
            }
            Command::Stats(id) => {
                let r = self
                    .runtime
                    .container_stats(cri::ContainerStatsRequest { container_id: id })
                    .await
                    .map_err(status)?;
                to_json(r.get_ref())?
            }
            Command::StopPod(id) => {
                self.stop_pod(id).await?;
                json!({})
            }
            Command::RemovePod(id) => {
                self.remove_pod(id).await?;
                json!({})
            }
            Command::Pods => json!({ "items": self.pods().await? }),
            Command::Containers(pod) => json!({ "items": self.containers(pod).await? }),
            Command::Images => {
                let r = self
                    .images
                    .list_images(cri::ListImagesRequest::default())
                    .await
                    .map_err(status)?;
                json!({ "items": to_json(&r.get_ref().images)? })
            }
            Command::Up(pod_config, handler, config) => {
                self.up(pod_config, handler, config).await?
            }
            Command::RemoveAll => self.remove_all().await?,
        })
    }

    async fn remove_container(&mut self, id: String) -> Result<()> {
        self.runtime
            .remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .map_err(status)?;
        Ok(())
    }

    async fn run_pod(&mut self, config: cri::PodSandboxConfig, handler: String) -> Result<String> {
        let r = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: handler,
            })
            .await
            .map_err(status)?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    async fn create(
        &mut self,
        pod: String,
        pod_config: cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> Result<String> {
        let r = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod,
                config: Some(config),
                sandbox_config: Some(pod_config),
            })
            .await
            .map_err(status)?;
        Ok(r.into_inner().container_id)
    }

    async fn start(&mut self, id: String) -> Result<()> {
        self.runtime
            .start_container(cri::StartContainerRequest { container_id: id })
            .await
            .map_err(status)?;
        Ok(())
    }

    async fn stop_pod(&mut self, id: String) -> Result<()> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id })
            .await
            .map_err(status)?;
        Ok(())
    }

    async fn remove_pod(&mut self, id: String) -> Result<()> {
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .map_err(status)?;
        Ok(())
    }

    /// ContainerStatus, with the state by name.
    async fn container_status(&mut self, id: String, verbose: bool) -> Result<Value> {
        let r = self
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id,
                verbose,
            })
            .await
            .map_err(status)?;
        let mut answer = to_json(r.get_ref())?;
        name_container_state(&mut answer["status"]["state"]);
        Ok(answer)
    }

    /// Polls ContainerStatus until the container is in `state`.
    async fn wait_for(
        &mut self,
        id: &str,
        state: ContainerState,
        limit: Duration,
    ) -> Result<Value> {
        let started = Instant::now();
        loop {
            let answer = self.container_status(id.to_string(), false).await?;
            if answer["status"]["state"] == json!(state.as_str_name()) {
                return Ok(answer);
            }
            if started.elapsed() > limit {
                bail!(
                    "{id} is still {} after {limit:?}, not {}",
                    answer["status"]["state"],
                    state.as_str_name()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn pods(&mut self) -> Result<Vec<Value>> {
        let r = self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .map_err(status)?;
        let mut items = Vec::new();
        for pod in &r.get_ref().items {
            let mut item = to_json(pod)?;
            name_pod_state(&mut item["state"]);
            items.push(item);
        }
        Ok(items)
    }

    async fn containers(&mut self, pod: String) -> Result<Vec<Value>> {
        let filter = (!pod.is_empty()).then(|| cri::ContainerFilter {
            pod_sandbox_id: pod,
            ..Default::default()
        });
        let r = self
            .runtime
            .list_containers(cri::ListContainersRequest { filter })
            .await
            .map_err(status)?;
        let mut items = Vec::new();
        for container in &r.get_ref().containers {
            let mut item = to_json(container)?;
            name_container_state(&mut item["state"]);
            items.push(item);
        }
        Ok(items)
    }

    /// A pod with one running container, kubelet's way, timing each step.
    async fn up(
        &mut self,
        pod_config: cri::PodSandboxConfig,
        handler: String,
        config: cri::ContainerConfig,
    ) -> Result<Value> {
        let t0 = Instant::now();
        let pod = self
            .run_pod(pod_config.clone(), handler)
            .await
            .context("RunPodSandbox")?;
        let runp_ms = millis(t0);
        let t1 = Instant::now();
        let container = self
            .create(pod.clone(), pod_config, config)
            .await
            .context("CreateContainer")?;
        let create_ms = millis(t1);
        let t2 = Instant::now();
        self.start(container.clone())
            .await
            .context("StartContainer")?;
        self.wait_for(
            &container,
            ContainerState::ContainerRunning,
            Duration::from_secs(300),
        )
        .await?;
        let start_ms = millis(t2);
        Ok(json!({
            "pod_id": pod,
            "container_id": container,
            "runp_ms": runp_ms,
            "create_ms": create_ms,
            "start_ms": start_ms,
            "elapsed_ms": millis(t0),
        }))
    }

    /// Stops and removes every pod (which removes their containers), then
    /// any container left; returns what it removed.
    async fn remove_all(&mut self) -> Result<Value> {
        let mut pods = Vec::new();
        for pod in self.pods().await? {
            let id = pod["id"].as_str().unwrap_or_default().to_string();
            self.stop_pod(id.clone())
                .await
                .with_context(|| format!("stopping pod {id}"))?;
            self.remove_pod(id.clone())
                .await
                .with_context(|| format!("removing pod {id}"))?;
            pods.push(id);
        }
        let mut containers = Vec::new();
        for container in self.containers(String::new()).await? {
            let id = container["id"].as_str().unwrap_or_default().to_string();
            self.remove_container(id.clone())
                .await
                .with_context(|| format!("removing container {id}"))?;
            containers.push(id);
        }
        Ok(json!({ "pods": pods, "containers": containers }))
    }
}

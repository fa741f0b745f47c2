//! One pod = one microVM: its VMM (started from a thread that lives as
//! long as the pod, so the VMM's parent-death signal fires only when the
//! shim dies), the agent connection, the pod's containers with their
//! processes, and what happens when the VM dies under them: every process
//! still running is reported exited (status 255) at once.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task as events;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::topics;
use protocols::agent;
use protocols::agent_ttrpc::AgentServiceClient;
use serde_json::Value;

use super::io::{self, StdioPaths};
use super::mounts::{self, MountSpec};
use super::process::{timestamp, Process, VM_DIED_EXIT};
use super::spec;
use crate::beneath::Dir;
use crate::config::SandboxConfig;
use crate::health::{self, AgentWatch};
use crate::network::PodNetwork;
use crate::process_exit::ExitWatch;
use crate::sandbox::{guest_share_dir, private_share_dir, remove_state, Sandbox, SHARED_FS_TAG};
use protocols::error_chain;

/// Publishes task events to containerd.
pub struct Events {
    pub publisher: RemotePublisher,
    pub namespace: String,
}

impl Events {
    pub fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let context = containerd_shim::Context::default();
        if let Err(e) = self
            .publisher
            .publish(context, topic, &self.namespace, event)
        {
            tracing::warn!("publishing {topic}: {}", error_chain(&e));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Agent(String),
    #[error("{0}")]
    Other(String),
}

impl From<PodError> for ttrpc::Error {
    fn from(e: PodError) -> Self {
        let code = match &e {
            PodError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            PodError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            PodError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            PodError::Agent(_) | PodError::Other(_) => ttrpc::Code::UNKNOWN,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

fn agent_error(what: &str) -> impl Fn(ttrpc::Error) -> PodError + '_ {
    move |e| PodError::Agent(format!("{what}: {}", protocols::error_message(&e)))
}

/// A container of the pod.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Arc<Process>,
    pub execs: HashMap<String, Arc<Process>>,
    /// Execs added but not started yet: their `process` JSON.
    pending_execs: HashMap<String, String>,
    /// `<mounts>/<id>` in the pod's private tree (the guest's
    /// `<shared>/<id>`): its rootfs and shared binds.
    share: PathBuf,
    /// The init's output copiers, started at create.
    init_output: Vec<JoinHandle<()>>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Result<&Arc<Process>, PodError> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| PodError::NotFound(format!("exec {exec_id} of {}", self.id)))
    }
}

pub struct Pod {
    pub id: String,
    client: AgentServiceClient,
    /// The agent connection, to break it when the VM dies.
    agent_stream: UnixStream,
    sandbox: Mutex<Option<Sandbox>>,
    pub vmm_pid: u32,
    /// The pod's private tree (see [`crate::sandbox::private_share_dir`]).
    private: PathBuf,
    state_dir: PathBuf,
    containers: Mutex<HashMap<String, Container>>,
    events: Arc<Events>,
    /// Dropping it ends the thread the VMM was started from.
    keeper: Mutex<Option<mpsc::Sender<()>>>,
    dead: AtomicBool,
    /// The guest pid of the pod's sandbox container's init (the container
    /// named like the pod), whose namespaces the others join.
    sandbox_pid: Mutex<Option<u32>>,
    /// The taps and tc redirects in the pod's network namespace.
    network: Mutex<Option<PodNetwork>>,
    /// The agent's health checks; dropped when the VM goes down.
    health: Mutex<Option<AgentWatch>>,
}

/// What the pod's VM is set up with besides its configuration.
pub struct PodSetup<'a> {
    pub hostname: &'a str,
    /// The pod's network namespace (CRI's), wired to the VM's NICs.
    pub netns: Option<std::fs::File>,
}

/// Where the shim keeps pod `id` of `namespace`.
pub fn state_dir(namespace: &str, id: &str) -> PathBuf {
    Path::new(super::STATE_ROOT).join(namespace).join(id)
}

impl Pod {
    /// Boots the pod's VM and prepares the guest for containers.
    pub fn boot(
        id: &str,
        namespace: &str,
        mut config: SandboxConfig,
        setup: PodSetup,
        events: Arc<Events>,
    ) -> Result<Arc<Pod>, PodError> {
        let hostname = setup.hostname;
        // Dropped (torn down) if the boot fails; the pod keeps it otherwise.
        let mut network = setup.netns.map(PodNetwork::wire).transpose().map_err(|e| {
            PodError::Other(format!("wiring the pod's network: {}", error_chain(&e)))
        })?;
        if let Some(network) = network.as_mut() {
            config.net = network.take_attachments().into();
        }
        let dir = state_dir(namespace, id);
        // Only root may enter the state tree: it holds every pod's volumes,
        // secrets and tokens (an older runtime made it 0755).
        let root = Path::new(super::STATE_ROOT);
        for private in [root.to_path_buf(), root.join(namespace)] {
            crate::sandbox::private_dir(&private).map_err(|e| {
                PodError::Other(format!("making {} private: {e}", private.display()))
            })?;
        }
        // A crashed shim's leftovers for the same pod.
        remove_state(&dir);
        config.state_dir = Some(dir.clone());
        config.late_mounts = true;
        let agent_timeout = config.agent_timeout;
        let unresponsive = config.agent_unresponsive;
        let (started_tx, started_rx) = mpsc::channel();
        let (keeper_tx, keeper_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(format!("vmm-{id}"))
            .spawn(move || {
                let _ = started_tx.send(Sandbox::start(&config));
                // Lives until the pod drops the sender: the VMM gets
                // SIGKILL when this thread ends (PR_SET_PDEATHSIG).
                let _ = keeper_rx.recv();
            })
            .map_err(|e| PodError::Other(format!("starting the VMM thread: {e}")))?;
        let mut sandbox = started_rx
            .recv()
            .map_err(|_| PodError::Other("the VMM thread died".into()))?
            .map_err(|e| PodError::Other(format!("starting the pod's VM: {}", error_chain(&e))))?;
        let stream = match sandbox.connect_agent(agent_timeout) {
            Ok(stream) => stream,
            Err(e) => {
                return Err(PodError::Other(format!(
                    "starting the pod's VM: {}",
                    error_chain(&e)
                )))
            }
        };
        let agent_stream = stream
            .try_clone()
            .map_err(|e| PodError::Other(format!("agent connection: {e}")))?;
        let client = AgentServiceClient::new(
            protocols::client_from_stream(stream)
                .map_err(|e| PodError::Other(format!("agent connection: {e}")))?,
        );
        client
            .create_sandbox(
                protocols::prompt_call(),
                &agent::CreateSandboxRequest {
                    sandbox_id: id.to_string(),
                    hostname: hostname.to_string(),
                    shared_fs_tag: SHARED_FS_TAG.to_string(),
                    ..Default::default()
                },
            )
            .map_err(agent_error("preparing the guest"))?;
        if let Some(network) = network.as_ref() {
            network
                .configure_guest(&client)
                .map_err(|e| PodError::Other(format!("configuring the guest's network: {e:#}")))?;
        }
        let pod = Arc::new(Pod {
            id: id.to_string(),
            client,
            agent_stream,
            vmm_pid: sandbox.vmm_pid(),
            private: private_share_dir(sandbox.state_dir()),
            state_dir: sandbox.state_dir().to_path_buf(),
            sandbox: Mutex::new(Some(sandbox)),
            containers: Mutex::new(HashMap::new()),
            events,
            keeper: Mutex::new(Some(keeper_tx)),
            dead: AtomicBool::new(false),
            sandbox_pid: Mutex::new(None),
            network: Mutex::new(network),
            health: Mutex::new(None),
        });
        watch_vm(Arc::downgrade(&pod), pod.vmm_pid);
        if let Some(limit) = unresponsive {
            let weak = Arc::downgrade(&pod);
            let watch = health::watch_agent(pod.client.clone(), limit, move |why| {
                if let Some(pod) = weak.upgrade() {
                    pod.vm_stuck(why);
                }
            })
            .map_err(|e| PodError::Other(format!("starting the agent's health checks: {e}")))?;
            *pod.health.lock().unwrap_or_else(|p| p.into_inner()) = Some(watch);
        }
        tracing::info!("pod {id}: VM up (VMM pid {})", pod.vmm_pid);
        Ok(pod)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on container `id`.
    pub fn with_container<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, PodError>,
    ) -> Result<T, PodError> {
        let mut containers = self.containers();
        let container = containers.get_mut(id).ok_or_else(|| {
            PodError::NotFound(format!("container {id} not found in pod {}", self.id))
        })?;
        f(container)
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, PodError> {
        self.with_container(id, |c| c.process(exec_id).cloned())
    }

    pub fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }

    /// Creates a container from its bundle: rootfs and binds into the
    /// shared directory, the spec rewritten for the guest, the agent's
    /// CreateContainer; its output copied from then on.
    pub fn create_container(
        &self,
        id: &str,
        bundle: &Path,
        rootfs: &[MountSpec],
        stdio: StdioPaths,
        spec: Value,
    ) -> Result<(), PodError> {
        if self.is_dead() {
            return Err(PodError::FailedPrecondition(format!(
                "the VM of pod {} is dead",
                self.id
            )));
        }
        if self.containers().contains_key(id) {
            return Err(PodError::InvalidArgument(format!(
                "container {id} already exists"
            )));
        }
        let share = self.private.join(id);
        let created = (|| {
            // Every mount point is made beneath the private tree, never
            // following a link (the tree is the guest's read-only anyway).
            let container = Dir::open(&self.private)
                .and_then(|private| private.create_dirs(Path::new(id)))
                .map_err(|e| {
                    PodError::InvalidArgument(format!(
                        "making the container's directory {}: {e}",
                        share.display()
                    ))
                })?;
            mounts::mount_rootfs(rootfs, &bundle.join("rootfs"), &container)
                .map_err(|e| PodError::Other(error_chain(&e)))?;
            let sandbox_pid = *self.sandbox_pid.lock().unwrap_or_else(|p| p.into_inner());
            let spec = spec::for_guest(spec, id, &container, sandbox_pid)
                .map_err(|e| PodError::InvalidArgument(error_chain(&e)))?;
            let created = self
                .client
                .create_container(
                    protocols::unbounded_call(),
                    &agent::CreateContainerRequest {
                        container_id: id.to_string(),
                        spec_json: spec.to_string(),
                        bundle: id.to_string(),
                        ..Default::default()
                    },
                )
                .map_err(agent_error("creating the container in the guest"))?;
            if id == self.id {
                *self.sandbox_pid.lock().unwrap_or_else(|p| p.into_inner()) = Some(created.pid);
            }
            let stdin = io::Stdin::open(&stdio.stdin);
            match stdin
                .and_then(|stdin| Ok((stdin, io::start_output(&self.client, id, id, &stdio)?)))
            {
                Ok(io) => Ok(io),
                Err(e) => {
                    self.remove_in_guest(id);
                    Err(PodError::InvalidArgument(error_chain(&e)))
                }
            }
        })();
        let (stdin, init_output) = match created {
            Ok(io) => io,
            Err(e) => {
                self.remove_share(&share);
                return Err(e);
            }
        };
        stdin.start(&self.client, id, id);
        let init = Arc::new(Process::new(id, "", stdio.clone(), stdin));
        self.containers().insert(
            id.to_string(),
            Container {
                id: id.to_string(),
                bundle: bundle.to_path_buf(),
                init,
                execs: HashMap::new(),
                pending_execs: HashMap::new(),
                share,
                init_output,
            },
        );
        self.events.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(events::TaskCreate {
                container_id: id.to_string(),
                bundle: bundle.display().to_string(),
                io: protobuf::MessageField::some(events::TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                }),
                pid: self.vmm_pid,
                ..Default::default()
            }),
        );
        Ok(())
    }

    /// Starts a created container's init, or an added exec.
    pub fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, PodError> {
        if exec_id.is_empty() {
            let (process, output) = self.with_container(id, |c| {
                Ok((c.init.clone(), std::mem::take(&mut c.init_output)))
            })?;
            self.client
                .start_container(
                    protocols::unbounded_call(),
                    &agent::StartContainerRequest {
                        container_id: id.to_string(),
                        ..Default::default()
                    },
                )
                .map_err(agent_error("starting the container"))?;
            process.set_running(self.vmm_pid);
            self.events.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(events::TaskStart {
                    container_id: id.to_string(),
                    pid: self.vmm_pid,
                    ..Default::default()
                }),
            );
            self.wait_in_background(process, output);
            return Ok(self.vmm_pid);
        }
        let (process, process_json) = self.with_container(id, |c| {
            let json = c.pending_execs.remove(exec_id).ok_or_else(|| {
                PodError::NotFound(format!("exec {exec_id} of {id} was not added"))
            })?;
            Ok((c.process(exec_id)?.clone(), json))
        })?;
        self.client
            .exec_in_container(
                protocols::unbounded_call(),
                &agent::ExecInContainerRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    process_json,
                    ..Default::default()
                },
            )
            .map_err(agent_error("starting the exec"))?;
        let output = io::start_output(&self.client, id, exec_id, &process.stdio)
            .map_err(|e| PodError::InvalidArgument(error_chain(&e)))?;
        process.stdin.start(&self.client, id, exec_id);
        process.set_running(self.vmm_pid);
        self.events.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(events::TaskExecStarted {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid: self.vmm_pid,
                ..Default::default()
            }),
        );
        self.wait_in_background(process, output);
        Ok(self.vmm_pid)
    }

    /// Adds an exec (started by [`Pod::start`]).
    pub fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: String,
        stdio: StdioPaths,
    ) -> Result<(), PodError> {
        self.with_container(id, |c| {
            if c.execs.contains_key(exec_id) {
                return Err(PodError::InvalidArgument(format!(
                    "exec {exec_id} of {id} exists"
                )));
            }
            // Opened now: containerd may send CloseIO before Start.
            let stdin = io::Stdin::open(&stdio.stdin)
                .map_err(|e| PodError::InvalidArgument(error_chain(&e)))?;
            c.execs.insert(
                exec_id.to_string(),
                Arc::new(Process::new(id, exec_id, stdio, stdin)),
            );
            c.pending_execs.insert(exec_id.to_string(), process_json);
            Ok(())
        })?;
        self.events.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(events::TaskExecAdded {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            }),
        );
        Ok(())
    }

    /// Waits (on a thread) for the process's end in the guest, lets its
    /// output drain, then records and publishes the exit.
    fn wait_in_background(self: &Arc<Self>, process: Arc<Process>, output: Vec<JoinHandle<()>>) {
        let pod = Arc::downgrade(self);
        let client = self.client.clone();
        std::thread::spawn(move || {
            let agent_exec_id = if process.exec_id.is_empty() {
                process.container_id.clone()
            } else {
                process.exec_id.clone()
            };
            let waited = client.wait_process(
                protocols::unbounded_call(),
                &agent::WaitProcessRequest {
                    container_id: process.container_id.clone(),
                    exec_id: agent_exec_id,
                    ..Default::default()
                },
            );
            // containerd's TaskOOM is the container's: any OOM kill in
            // its cgroup (as runc's shim reports memory.events), published
            // once, with its init's exit.
            let is_init = process.exec_id.is_empty();
            let (status, oom) = match waited {
                Ok(w) if w.signal != 0 => (128 + w.signal, is_init && w.oom_kills > 0),
                Ok(w) => (w.status as u32, is_init && w.oom_kills > 0),
                Err(_) => (VM_DIED_EXIT, false),
            };
            drain(output, Duration::from_secs(2));
            let Some(pod) = pod.upgrade() else { return };
            if oom {
                pod.events.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(events::TaskOOM {
                        container_id: process.container_id.clone(),
                        ..Default::default()
                    }),
                );
            }
            pod.record_exit(&process, status);
        });
    }

    fn record_exit(&self, process: &Process, status: u32) {
        if !process.set_exited(status) {
            return;
        }
        let exit = process.exit().expect("just set");
        let id = if process.exec_id.is_empty() {
            process.container_id.clone()
        } else {
            process.exec_id.clone()
        };
        self.events.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(events::TaskExit {
                container_id: process.container_id.clone(),
                id,
                pid: self.vmm_pid,
                exit_status: status,
                exited_at: protobuf::MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
        );
    }

    /// Signals a process (every process of the container with `all`).
    pub fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), PodError> {
        let process = self.process(id, exec_id)?;
        if process.exit().is_some() || self.is_dead() {
            return Ok(());
        }
        self.client
            .signal_process(
                protocols::prompt_call(),
                &agent::SignalProcessRequest {
                    container_id: id.to_string(),
                    exec_id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                    signal,
                    all,
                    ..Default::default()
                },
            )
            .map_err(agent_error("signalling the process"))?;
        Ok(())
    }

    /// Deletes an exec, or a container (its init must have ended or never
    /// started). Returns the process's exit.
    pub fn delete(&self, id: &str, exec_id: &str) -> Result<(u32, super::process::Exit), PodError> {
        if !exec_id.is_empty() {
            return self.with_container(id, |c| {
                let process = c.process(exec_id)?.clone();
                let exit = delete_exit(&process)?;
                c.execs.remove(exec_id);
                c.pending_execs.remove(exec_id);
                process.stdin.stop();
                Ok((self.vmm_pid, exit))
            });
        }
        let container = {
            let mut containers = self.containers();
            let container = containers
                .get(id)
                .ok_or_else(|| PodError::NotFound(format!("container {id} not found")))?;
            delete_exit(&container.init)?;
            containers.remove(id).expect("just found")
        };
        if !self.is_dead() {
            self.remove_in_guest(id);
        }
        for process in std::iter::once(&container.init).chain(container.execs.values()) {
            process.stdin.stop();
        }
        self.remove_share(&container.share);
        let exit = container.init.exit().expect("checked by delete_exit");
        self.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(events::TaskDelete {
                container_id: id.to_string(),
                id: id.to_string(),
                pid: self.vmm_pid,
                exit_status: exit.status,
                exited_at: protobuf::MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
        );
        tracing::info!(
            "pod {}: container {id} deleted ({})",
            self.id,
            container.bundle.display()
        );
        Ok((self.vmm_pid, exit))
    }

    /// Unmounts a container's mounts (in the private tree, and what
    /// propagated of them to the guest's view) and removes its directory.
    fn remove_share(&self, share: &Path) {
        if let Some(name) = share.file_name() {
            mounts::unmount_under(&guest_share_dir(&self.state_dir).join(name));
        }
        mounts::unmount_and_remove(share);
    }

    fn remove_in_guest(&self, id: &str) {
        let request = agent::RemoveContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        if let Err(e) = self
            .client
            .remove_container(protocols::prompt_call(), &request)
        {
            tracing::warn!(
                "removing {id} in the guest: {}",
                protocols::error_message(&e)
            );
        }
    }

    pub fn pause(&self, id: &str, paused: bool) -> Result<(), PodError> {
        let container_id = id.to_string();
        if paused {
            self.client
                .pause_container(
                    protocols::prompt_call(),
                    &agent::PauseContainerRequest {
                        container_id,
                        ..Default::default()
                    },
                )
                .map_err(agent_error("pausing"))?;
        } else {
            self.client
                .resume_container(
                    protocols::prompt_call(),
                    &agent::ResumeContainerRequest {
                        container_id,
                        ..Default::default()
                    },
                )
                .map_err(agent_error("resuming"))?;
        }
        self.with_container(id, |c| {
            for process in std::iter::once(&c.init).chain(c.execs.values()) {
                process.set_paused(paused);
            }
            Ok(())
        })?;
        let id = id.to_string();
        if paused {
            self.events.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(events::TaskPaused {
                    container_id: id,
                    ..Default::default()
                }),
            );
        } else {
            self.events.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(events::TaskResumed {
                    container_id: id,
                    ..Default::default()
                }),
            );
        }
        Ok(())
    }

    pub fn agent(&self) -> &AgentServiceClient {
        &self.client
    }

    /// Ends the VM: asks the agent to power off, waits a moment, kills the
    /// VMM if needed, removes the pod's state.
    pub fn shut_down(&self) {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).take();
        let quiesced = !self.is_dead()
            && self
                .client
                .shutdown(protocols::quick_call(2), &agent::ShutdownRequest::default())
                .is_ok();
        self.dead.store(true, Ordering::SeqCst);
        let _ = self.agent_stream.shutdown(std::net::Shutdown::Both);
        let sandbox = self
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut sandbox) = sandbox {
            if quiesced {
                sandbox.guest_quiesced();
            }
            sandbox.stop(Duration::from_secs(2));
        }
        self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut network) = self
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            network.tear_down();
        }
        remove_state(&self.state_dir);
        tracing::info!("pod {}: VM stopped", self.id);
    }

    /// Called when the VMM is found dead: every live process exits.
    fn vm_died(&self, why: String) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!("pod {}: {why}", self.id);
        let _ = self.agent_stream.shutdown(std::net::Shutdown::Both);
        let processes: Vec<Arc<Process>> = self
            .containers()
            .values()
            .flat_map(|c| std::iter::once(c.init.clone()).chain(c.execs.values().cloned()))
            .filter(|p| p.status() != containerd_shim_protos::types::task::Status::CREATED)
            .collect();
        for process in processes {
            self.record_exit(&process, VM_DIED_EXIT);
        }
    }

    /// Called when the guest stopped answering while its VMM lives on: the
    /// pod's processes end as for a dead VM, and the VMM is killed.
    fn vm_stuck(&self, why: String) {
        tracing::error!("pod {}: {why}; killing its VM", self.id);
        if let Some(sandbox) = self
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            sandbox.kill();
        }
        // The exits go out once the VMM is gone (unless the VMM watch, which
        // may see the death first, has sent them already).
        self.vm_died(format!("{why}; its VM was killed"));
    }
}

/// The exit a deleted process reports: its own, or (never started) now.
fn delete_exit(process: &Process) -> Result<super::process::Exit, PodError> {
    use containerd_shim_protos::types::task::Status;
    match process.status() {
        Status::CREATED => {
            process.set_exited(0);
        }
        Status::STOPPED => {}
        _ => {
            return Err(PodError::FailedPrecondition(format!(
                "{} is still running: kill it first",
                if process.exec_id.is_empty() {
                    &process.container_id
                } else {
                    &process.exec_id
                }
            )))
        }
    }
    Ok(process.exit().expect("stopped"))
}

/// Waits up to `limit` for output copiers to reach their streams' ends (a
/// process's children may hold its output open).
fn drain(threads: Vec<JoinHandle<()>>, limit: Duration) {
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for thread in threads {
            let _ = thread.join();
        }
        let _ = done_tx.send(());
    });
    let _ = done_rx.recv_timeout(limit);
}

/// Waits for the VMM to end (woken by its pidfd, no polling); when it has,
/// the pod's processes are ended too.
fn watch_vm(pod: Weak<Pod>, vmm_pid: u32) {
    let exit = ExitWatch::new(vmm_pid);
    std::thread::spawn(move || loop {
        let exited = exit.wait(None);
        let Some(pod) = pod.upgrade() else { return };
        if pod.is_dead() {
            return;
        }
        let death = {
            let mut sandbox = pod.sandbox.lock().unwrap_or_else(|p| p.into_inner());
            match sandbox.as_mut() {
                // Its exit status follows its exit closely.
                Some(sandbox) if exited => sandbox.death_within(Duration::from_secs(1)),
                Some(sandbox) => sandbox.death(),
                None => return,
            }
            .map(|e| error_chain(&e))
        };
        match death {
            Some(why) => {
                pod.vm_died(why);
                return;
            }
            None if exited => {
                tracing::warn!("pod {}: its VMM exited but has no exit status", pod.id);
                return;
            }
            None => {}
        }
    });
}

//! The shim's life and its task service.
//!
//! `start` (run by containerd for every new task) groups tasks by pod: it
//! spawns the long-lived shim on a socket derived from the pod's id, or
//! finds it already serving and prints its address. The long-lived shim
//! serves `containerd.task.v2.Task`; its first Create boots the pod's VM.
//! `delete` (run by containerd when a shim died) cleans up after it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use containerd_shim::api;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult};
use containerd_shim_protos::cgroups_v2::metrics as cg2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::Task;
use protocols::agent;

use super::io::StdioPaths;
use super::mounts::{self, MountSpec};
use super::pod::{state_dir, Events, Pod, PodError, PodSetup};
use super::process::timestamp;
use super::spec;
use crate::sandbox::remove_state;

/// containerd's `Shim`: start, delete, and the task service.
pub struct KataShim {
    namespace: String,
    id: String,
    /// containerd's address: the shim sockets' names derive from it.
    address: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for KataShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        KataShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        start_pod_shim(opts)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        // The shim died: unmount what it mounted for this container, and
        // the pod's state if this was the pod's own container.
        let spec = spec::read(Path::new("."));
        let pod_id = spec
            .as_ref()
            .map(|s| spec::pod_id(s, &self.id))
            .unwrap_or_else(|_| self.id.clone());
        let dir = state_dir(&self.namespace, &pod_id);
        mounts::unmount_under(&crate::sandbox::guest_share_dir(&dir).join(&self.id));
        mounts::unmount_and_remove(&crate::sandbox::private_share_dir(&dir).join(&self.id));
        if pod_id == self.id {
            // The VMM's cgroup, as `Sandbox::start` chose it.
            let cgroup = spec
                .as_ref()
                .ok()
                .and_then(spec::cgroups_path)
                .unwrap_or_else(|| crate::cgroup::VmmCgroup::default_path(&pod_id));
            crate::cgroup::remove_leftover(&cgroup);
            remove_state(&dir);
            remove_dead_socket(&containerd_shim::socket_address(
                &self.address,
                &self.namespace,
                &pod_id,
            ));
        }
        Ok(api::DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(timestamp(std::time::SystemTime::now())),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService {
            namespace: self.namespace.clone(),
            events: Arc::new(Events {
                publisher,
                namespace: self.namespace.clone(),
            }),
            pod: Mutex::new(None),
            exit: self.exit.clone(),
        }
    }
}

/// Removes a dead shim's socket (a killed shim leaves it), unless a shim
/// listens on it.
fn remove_dead_socket(address: &str) {
    let path = address.trim_start_matches("unix://");
    let refused = matches!(
        std::os::unix::net::UnixStream::connect(path),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    );
    if refused {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!("removed the dead shim's socket {path}"),
            Err(e) => tracing::warn!("removing the dead shim's socket {path}: {e}"),
        }
    }
}

/// containerd's `start`: spawns the pod's long-lived shim, or finds it
/// serving already, on a socket derived from the pod's id; writes and
/// returns its address.
pub fn start_pod_shim(opts: StartOpts) -> containerd_shim::Result<String> {
    // The cwd is the bundle; its spec says which pod the task is of.
    let pod_id = spec::read(Path::new("."))
        .map(|s| spec::pod_id(&s, &opts.id))
        .unwrap_or_else(|_| opts.id.clone());
    // Returns when the shim serves, or failed (its errors went to our
    // stderr, which containerd reports).
    let (pid, address) = containerd_shim::spawn(opts, &pod_id, Vec::new())?;
    let path = address.trim_start_matches("unix://");
    if let Err(e) = std::os::unix::net::UnixStream::connect(path) {
        return Err(containerd_shim::Error::Other(format!(
            "the shim (pid {pid}) is not serving on {address}: {e}"
        )));
    }
    containerd_shim::util::write_address(&address)?;
    Ok(address)
}

/// Handles `start` as containerd 1.6 and 1.7 expect it: the address alone
/// on stdout. (The shim library answers `start` with containerd 2's JSON
/// result, which 1.6 cannot parse.)
pub fn start_for_containerd_1(flags: &Flags) -> Result<String, String> {
    if flags.namespace.is_empty() {
        return Err("the shim namespace (-namespace) is empty".into());
    }
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    start_pod_shim(opts).map_err(|e| protocols::error_chain(&e))
}

/// `containerd.task.v2.Task` for the pod this shim serves.
pub struct TaskService {
    namespace: String,
    events: Arc<Events>,
    pod: Mutex<Option<Arc<Pod>>>,
    exit: Arc<ExitSignal>,
}

fn ttrpc_error(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

impl TaskService {
    fn pod(&self) -> Result<Arc<Pod>, PodError> {
        self.pod
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| PodError::NotFound("this shim runs no pod yet".into()))
    }

    /// The pod for a new container: booted by the first one.
    fn pod_for(
        &self,
        id: &str,
        spec: &serde_json::Value,
        config_path: Option<&Path>,
    ) -> Result<Arc<Pod>, PodError> {
        let mut slot = self.pod.lock().unwrap_or_else(|p| p.into_inner());
        let pod_id = spec::pod_id(spec, id);
        if let Some(pod) = slot.as_ref() {
            if pod.id != pod_id {
                return Err(PodError::InvalidArgument(format!(
                    "container {id} is of pod {pod_id}, but this shim runs pod {}",
                    pod.id
                )));
            }
            return Ok(pod.clone());
        }
        let (mut config, sizing) =
            crate::shim_config::sandbox_config(config_path, crate::shim_config::Host::this())
                .map_err(PodError::FailedPrecondition)?;
        let workload = spec::pod_workload(spec).map_err(PodError::InvalidArgument)?;
        let clamped = crate::shim_config::size_for_workload(&mut config, workload, sizing);
        for what in &clamped {
            tracing::warn!("pod {pod_id}: {what}");
        }
        if workload != spec::PodWorkload::default() {
            tracing::info!(
                "pod {pod_id}: containers' limits {} MiB, {} CPUs: VM of {} MiB, {} vCPUs",
                workload.memory_mib,
                workload.vcpus,
                config.memory_mib,
                config.cpus
            );
        }
        // The VMM runs in the sandbox's cgroup (as Kata's
        // sandbox_cgroup_only): kubelet's accounting of the pod sees it.
        config.cgroup_path = spec::cgroups_path(spec);
        let hostname = spec["hostname"].as_str().unwrap_or_default();
        // The netns is complete when the sandbox task is created: CRI runs
        // CNI ADD before it.
        let netns = spec::network_namespace(spec)
            .map(|path| {
                std::fs::File::open(path).map_err(|e| {
                    PodError::InvalidArgument(format!(
                        "opening the pod's network namespace {path}: {e}"
                    ))
                })
            })
            .transpose()?;
        let pod = Pod::boot(
            &pod_id,
            &self.namespace,
            config,
            PodSetup { hostname, netns },
            self.events.clone(),
        )?;
        *slot = Some(pod.clone());
        Ok(pod)
    }

    /// After a container went: the VM goes with the pod's last one.
    fn release_if_empty(&self) {
        let mut slot = self.pod.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|pod| pod.is_empty()) {
            if let Some(pod) = slot.take() {
                pod.shut_down();
            }
        }
    }
}

impl Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!("create {} in {}", req.id, req.bundle);
        if !req.checkpoint.is_empty() {
            return Err(ttrpc_error(
                ttrpc::Code::UNIMPLEMENTED,
                "restoring checkpoints is not supported",
            ));
        }
        let bundle = Path::new(&req.bundle);
        let spec = spec::read(bundle)
            .map_err(|e| PodError::InvalidArgument(protocols::error_chain(&e)))?;
        let config_path = match req.options.as_ref() {
            Some(any) => crate::shim_config::config_path_option(&any.type_url, &any.value)
                .map_err(PodError::InvalidArgument)?,
            None => None,
        };
        let pod = self.pod_for(&req.id, &spec, config_path.as_deref())?;
        let rootfs: Vec<MountSpec> = req
            .rootfs
            .iter()
            .map(|m| MountSpec {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = pod.create_container(&req.id, bundle, &rootfs, stdio, spec);
        if let Err(e) = created {
            self.release_if_empty();
            return Err(e.into());
        }
        Ok(api::CreateTaskResponse {
            pid: pod.vmm_pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.pod()?.start(&req.id, &req.exec_id)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self.pod()?.delete(&req.id, &req.exec_id)?;
        if req.exec_id.is_empty() {
            self.release_if_empty();
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let process_json = req
            .spec
            .as_ref()
            .map(|any| String::from_utf8_lossy(&any.value).into_owned())
            .ok_or_else(|| {
                ttrpc_error(ttrpc::Code::INVALID_ARGUMENT, "exec without a process spec")
            })?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.pod()?
            .add_exec(&req.id, &req.exec_id, process_json, stdio)?;
        Ok(Empty::new())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pod = self.pod()?;
        let (bundle, process) = pod.with_container(&req.id, |c| {
            Ok((
                c.bundle.display().to_string(),
                c.process(&req.exec_id)?.clone(),
            ))
        })?;
        let exit = process.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle,
            pid: pod.vmm_pid,
            status: process.status().into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: match exit {
                Some(e) => MessageField::some(timestamp(e.at)),
                None => MessageField::none(),
            },
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let process = self.pod()?.process(&req.id, &req.exec_id)?;
        let exit = process.wait();
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        self.pod()?
            .kill(&req.id, &req.exec_id, req.signal, req.all)?;
        Ok(Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pod = self.pod()?;
        let listed = pod
            .agent()
            .list_pids(
                protocols::prompt_call(),
                &agent::ListPidsRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .map_err(|e| {
                PodError::Agent(format!("listing pids: {}", protocols::error_message(&e)))
            })?;
        Ok(api::PidsResponse {
            processes: listed
                .pids
                .iter()
                .map(|pid| containerd_shim_protos::types::task::ProcessInfo {
                    pid: *pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.pod()?.pause(&req.id, true)?;
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.pod()?.pause(&req.id, false)?;
        Ok(Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(ttrpc_error(
            ttrpc::Code::UNIMPLEMENTED,
            "checkpoint is not supported by microvm (containerd-shim-kata-v2)",
        ))
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let pod = self.pod()?;
        pod.agent()
            .resize_tty(
                protocols::quick_call(10),
                &agent::ResizeTtyRequest {
                    container_id: req.id.clone(),
                    exec_id: if req.exec_id.is_empty() {
                        &req.id
                    } else {
                        &req.exec_id
                    }
                    .clone(),
                    rows: req.height,
                    cols: req.width,
                    ..Default::default()
                },
            )
            .map_err(|e| {
                PodError::Agent(format!(
                    "resizing the tty: {}",
                    protocols::error_message(&e)
                ))
            })?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            // The process's stdin closes in the guest once the copy has
            // delivered everything containerd wrote before this call.
            self.pod()?.process(&req.id, &req.exec_id)?.stdin.close();
        }
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let pod = self.pod()?;
        let resources_json = req
            .resources
            .as_ref()
            .map(|any| String::from_utf8_lossy(&any.value).into_owned())
            .unwrap_or_else(|| "{}".into());
        pod.agent()
            .update_container(
                protocols::prompt_call(),
                &agent::UpdateContainerRequest {
                    container_id: req.id.clone(),
                    resources_json,
                    ..Default::default()
                },
            )
            .map_err(|e| {
                PodError::Agent(format!(
                    "updating resources: {}",
                    protocols::error_message(&e)
                ))
            })?;
        Ok(Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let pod = self.pod()?;
        let stats = pod
            .agent()
            .stats_container(
                protocols::prompt_call(),
                &agent::StatsContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .map_err(|e| {
                PodError::Agent(format!("reading stats: {}", protocols::error_message(&e)))
            })?;
        let metrics = cgroup_v2_metrics(&stats);
        let any = Any {
            type_url: "io.containerd.cgroups.v2.Metrics".into(),
            value: metrics
                .write_to_bytes()
                .map_err(|e| ttrpc_error(ttrpc::Code::INTERNAL, e.to_string()))?,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod().map(|p| p.vmm_pid).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        let busy = self
            .pod
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|pod| !pod.is_empty());
        if !busy {
            self.release_if_empty();
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

/// The agent's cgroup v2 counters as containerd's v2 `Metrics`.
fn cgroup_v2_metrics(stats: &agent::StatsContainerResponse) -> cg2::Metrics {
    let mut metrics = cg2::Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        metrics.cpu = MessageField::some(cg2::CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(memory) = stats.memory.as_ref() {
        let stat = |key: &str| memory.stat.get(key).copied().unwrap_or(0);
        metrics.memory = MessageField::some(cg2::MemoryStat {
            usage: memory.usage,
            usage_limit: memory.limit,
            swap_usage: memory.swap_usage,
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            ..Default::default()
        });
        metrics.memory_events = MessageField::some(cg2::MemoryEvents {
            oom: memory.oom_events,
            oom_kill: memory.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        metrics.pids = MessageField::some(cg2::PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    metrics.io = MessageField::some(cg2::IOStat {
        usage: stats
            .io
            .iter()
            .map(|e| cg2::IOEntry {
                major: e.major.into(),
                minor: e.minor.into(),
                rbytes: e.rbytes,
                wbytes: e.wbytes,
                rios: e.rios,
                wios: e.wios,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    metrics
}

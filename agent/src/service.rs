//! The ttrpc `AgentService`: each request mapped onto the process table,
//! each failure onto a ttrpc status code the runtime can act on.

use std::sync::Arc;
use std::time::Duration;

use protocols::agent::*;
use protocols::agent_ttrpc::AgentService;
use protocols::error_chain;
use ttrpc::{Code, TtrpcContext};

use crate::container::{ContainerError, Containers};
use crate::network::NetworkError;
use crate::process::{Exit, Process, ProcessError, ProcessTable, Spec, Stream};

/// Most bytes one ReadStdout/ReadStderr returns.
pub const MAX_READ: usize = 64 * 1024;

pub struct Agent {
    processes: Arc<ProcessTable>,
    containers: Containers,
    /// Where the sandbox's shared file system is mounted, once it is.
    share: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// As PID 1, Shutdown resets the VM; otherwise (host tests) it exits.
    is_init: bool,
}

impl Agent {
    pub fn new(processes: Arc<ProcessTable>, is_init: bool) -> Self {
        Self {
            containers: Containers::new(processes.clone()),
            processes,
            share: std::sync::Mutex::new(None),
            is_init,
        }
    }
}

fn status(error: ProcessError) -> ttrpc::Error {
    let code = match &error {
        ProcessError::UnknownProcess(_) | ProcessError::NotFound { .. } => Code::NOT_FOUND,
        ProcessError::PermissionDenied { .. } => Code::PERMISSION_DENIED,
        ProcessError::AlreadyRunning(_) => Code::ALREADY_EXISTS,
        ProcessError::EmptyArgv | ProcessError::Cwd { .. } | ProcessError::Signal { .. } => {
            Code::INVALID_ARGUMENT
        }
        ProcessError::StdinClosed(_) | ProcessError::NoTerminal(_) => Code::FAILED_PRECONDITION,
        ProcessError::Spawn { .. } | ProcessError::Io { .. } => Code::INTERNAL,
    };
    protocols::status(code, error_chain(&error))
}

fn container_status(error: ContainerError) -> ttrpc::Error {
    let code = match &error {
        ContainerError::Process(_) => {
            let ContainerError::Process(inner) = error else {
                unreachable!()
            };
            return status(inner);
        }
        ContainerError::InvalidSpec(_) => Code::INVALID_ARGUMENT,
        ContainerError::NotFound(_) | ContainerError::ExecNotFound(_) => Code::NOT_FOUND,
        ContainerError::Exists(_) => Code::ALREADY_EXISTS,
        ContainerError::WrongState { .. } => Code::FAILED_PRECONDITION,
        ContainerError::ExecDenied(_) => Code::PERMISSION_DENIED,
        ContainerError::Setup(_) | ContainerError::Cgroup(_) => Code::INTERNAL,
    };
    protocols::status(code, error_chain(&error))
}

/// A network failure as the status of `rpc`: a bad request is
/// INVALID_ARGUMENT, a kernel refusal is mapped from its errno.
fn network_status(rpc: &str, error: NetworkError) -> ttrpc::Error {
    let code = match &error {
        NetworkError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        NetworkError::Netlink { .. } => match error.errno() {
            Some(libc::EINVAL | libc::ERANGE | libc::EAFNOSUPPORT) => Code::INVALID_ARGUMENT,
            Some(libc::EEXIST) => Code::ALREADY_EXISTS,
            Some(libc::EPERM | libc::EACCES) => Code::PERMISSION_DENIED,
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::ENETUNREACH | libc::EBUSY) => {
                Code::FAILED_PRECONDITION
            }
            _ => Code::INTERNAL,
        },
        NetworkError::Setup(_) => Code::INTERNAL,
    };
    let message = format!("{rpc}: {}", error_chain(&error));
    tracing::warn!("{message}");
    protocols::status(code, message)
}

impl AgentService for Agent {
    fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let spec = Spec {
            argv: req.argv,
            env: req.env,
            cwd: req.cwd,
        };
        let process = self.processes.spawn(&req.exec_id, &spec).map_err(status)?;
        tracing::debug!("started {:?} as pid {}", spec.argv, process.pid);
        Ok(ExecProcessResponse::default())
    }

    fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read(req, Stream::Stdout)
    }

    fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read(req, Stream::Stderr)
    }

    fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        process.write_stdin(&req.data).map_err(status)?;
        Ok(WriteStreamResponse {
            len: req.data.len() as u32,
            ..Default::default()
        })
    }

    fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<CloseStdinResponse> {
        self.process(&req.container_id, &req.exec_id)?.close_stdin();
        Ok(CloseStdinResponse::default())
    }

    fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<SignalProcessResponse> {
        if req.container_id.is_empty() {
            let process = self.processes.get(&req.exec_id).map_err(status)?;
            process.signal(req.signal as i32).map_err(status)?;
        } else {
            self.containers
                .signal(&req.container_id, &req.exec_id, req.signal as i32, req.all)
                .map_err(container_status)?;
        }
        Ok(SignalProcessResponse::default())
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        let (status, signal) = match process.wait() {
            Exit::Code(code) => (code, 0),
            Exit::Signal(signal) => (0, signal as u32),
        };
        let mut response = WaitProcessResponse {
            status,
            signal,
            ..Default::default()
        };
        if !req.container_id.is_empty() {
            let oom = self.containers.oom_report(&req.container_id, &process);
            response.oom_killed = oom.process_killed;
            response.oom_kills = oom.kills;
            response.oom_victims = oom.victims;
        }
        Ok(response)
    }

    fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(|e| {
                protocols::status(
                    Code::INVALID_ARGUMENT,
                    format!("hostname {:?}: {e}", req.hostname),
                )
            })?;
        }
        if !req.shared_fs_tag.is_empty() {
            let path = crate::init::mount_shared_fs(&req.shared_fs_tag)
                .map_err(|e| protocols::status(Code::INTERNAL, error_chain(&e)))?;
            *self.share.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
        }
        Ok(CreateSandboxResponse::default())
    }

    fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> ttrpc::Result<DestroySandboxResponse> {
        self.containers.remove_all();
        if let Some(path) = self.share.lock().unwrap_or_else(|p| p.into_inner()).take() {
            crate::init::unmount_shared_fs(&path);
        }
        Ok(DestroySandboxResponse::default())
    }

    fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let share = self
            .share
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from("/"));
        let bundle = crate::container::bundle_in_share(&share, &req.bundle);
        let pid = self
            .containers
            .create(&req.container_id, &req.spec_json, &bundle)
            .map_err(container_status)?;
        tracing::debug!("created container {} (init pid {pid})", req.container_id);
        Ok(CreateContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        self.containers
            .start(&req.container_id)
            .map_err(container_status)?;
        Ok(StartContainerResponse::default())
    }

    fn exec_in_container(
        &self,
        _ctx: &TtrpcContext,
        req: ExecInContainerRequest,
    ) -> ttrpc::Result<ExecInContainerResponse> {
        let pid = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process_json)
            .map_err(container_status)?;
        Ok(ExecInContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        req: ResizeTtyRequest,
    ) -> ttrpc::Result<ResizeTtyResponse> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        process
            .resize(
                req.rows.min(u16::MAX as u32) as u16,
                req.cols.min(u16::MAX as u32) as u16,
            )
            .map_err(status)?;
        Ok(ResizeTtyResponse::default())
    }

    fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: ListPidsRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        Ok(ListPidsResponse {
            pids: self
                .containers
                .pids(&req.container_id)
                .map_err(container_status)?,
            ..Default::default()
        })
    }

    fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.containers
            .stats(&req.container_id)
            .map_err(container_status)
    }

    fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<PauseContainerResponse> {
        self.containers
            .pause(&req.container_id)
            .map_err(container_status)?;
        Ok(PauseContainerResponse::default())
    }

    fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<ResumeContainerResponse> {
        self.containers
            .resume(&req.container_id)
            .map_err(container_status)?;
        Ok(ResumeContainerResponse::default())
    }

    fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<UpdateContainerResponse> {
        self.containers
            .update(&req.container_id, &req.resources_json)
            .map_err(container_status)?;
        Ok(UpdateContainerResponse::default())
    }

    fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<RemoveContainerResponse> {
        self.containers
            .remove(&req.container_id)
            .map_err(container_status)?;
        Ok(RemoveContainerResponse::default())
    }

    fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<UpdateInterfaceResponse> {
        let wanted = req.interface.as_ref().ok_or_else(|| {
            protocols::status(
                Code::INVALID_ARGUMENT,
                "UpdateInterface: no interface given",
            )
        })?;
        let applied = crate::network::update_interface(wanted)
            .map_err(|e| network_status("UpdateInterface", e))?;
        Ok(UpdateInterfaceResponse {
            interface: Some(applied).into(),
            ..Default::default()
        })
    }

    fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<UpdateRoutesResponse> {
        let routes = crate::network::update_routes(&req.routes)
            .map_err(|e| network_status("UpdateRoutes", e))?;
        Ok(UpdateRoutesResponse {
            routes,
            ..Default::default()
        })
    }

    fn add_arp_neighbors(
        &self,
        _ctx: &TtrpcContext,
        req: AddArpNeighborsRequest,
    ) -> ttrpc::Result<AddArpNeighborsResponse> {
        crate::network::add_arp_neighbors(&req.neighbors)
            .map_err(|e| network_status("AddArpNeighbors", e))?;
        Ok(AddArpNeighborsResponse::default())
    }

    fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        let is_init = self.is_init;
        if is_init {
            // The host kills the VMM as soon as it has the reply: every
            // process ends and dirty data (of files still mapped; closed
            // files were written back at their close) reaches the host first.
            crate::init::quiesce();
        }
        // Answer first; end a moment later.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            if is_init {
                // Quiesced above: what is left is the reset.
                crate::init::reboot();
            } else {
                std::process::exit(0);
            }
        });
        Ok(ShutdownResponse::default())
    }
}

impl Agent {
    /// A guest-level process (empty container id) or a container's; an
    /// empty exec id names the container's init.
    fn process(&self, container_id: &str, exec_id: &str) -> ttrpc::Result<Arc<Process>> {
        let exec_id = if exec_id.is_empty() {
            container_id
        } else {
            exec_id
        };
        self.processes
            .lookup(&(container_id.to_string(), exec_id.to_string()))
            .map_err(status)
    }

    fn read(&self, req: ReadStreamRequest, stream: Stream) -> ttrpc::Result<ReadStreamResponse> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        let max = match req.len as usize {
            0 => MAX_READ,
            len => len.min(MAX_READ),
        };
        Ok(ReadStreamResponse {
            data: process.read(stream, max).map_err(status)?,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENOENT: &str = "No such file or directory (os error 2)";

    fn message(error: ttrpc::Error) -> String {
        protocols::error_message(&error)
    }

    /// The runtime sees only the status message: it carries the cause,
    /// once, though the error's own message leaves it to its source.
    #[test]
    fn statuses_carry_the_cause_once() {
        let cwd = || ProcessError::Cwd {
            cwd: "/nonexistent".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(cwd().to_string(), "working directory /nonexistent");
        let expected = format!("working directory /nonexistent: {ENOENT}");
        assert_eq!(message(status(cwd())), expected);
        assert_eq!(
            message(container_status(ContainerError::Process(cwd()))),
            expected
        );
        let netlink = NetworkError::Netlink {
            what: "adding route 10.0.0.0/8".into(),
            source: std::io::Error::from_raw_os_error(libc::EEXIST),
        };
        assert_eq!(
            message(network_status("UpdateRoutes", netlink)),
            "UpdateRoutes: adding route 10.0.0.0/8: File exists (os error 17)"
        );
    }
}

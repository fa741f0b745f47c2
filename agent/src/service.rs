//! The ttrpc `AgentService`: each request mapped onto the process table,
//! each failure onto a ttrpc status code the runtime can act on.

use std::sync::Arc;
use std::time::Duration;

use protocols::agent::*;
use protocols::agent_ttrpc::AgentService;
use ttrpc::{Code, TtrpcContext};

use crate::process::{Exit, ProcessError, ProcessTable, Spec, Stream};

/// Most bytes one ReadStdout/ReadStderr returns.
pub const MAX_READ: usize = 64 * 1024;

pub struct Agent {
    processes: Arc<ProcessTable>,
    /// As PID 1, Shutdown resets the VM; otherwise (host tests) it exits.
    is_init: bool,
}

impl Agent {
    pub fn new(processes: Arc<ProcessTable>, is_init: bool) -> Self {
        Self { processes, is_init }
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
        ProcessError::StdinClosed(_) => Code::FAILED_PRECONDITION,
        ProcessError::Spawn { .. } | ProcessError::Io { .. } => Code::INTERNAL,
    };
    protocols::status(code, error.to_string())
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
        let process = self.processes.get(&req.exec_id).map_err(status)?;
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
        self.processes
            .get(&req.exec_id)
            .map_err(status)?
            .close_stdin();
        Ok(CloseStdinResponse::default())
    }

    fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<SignalProcessResponse> {
        let process = self.processes.get(&req.exec_id).map_err(status)?;
        process.signal(req.signal as i32).map_err(status)?;
        Ok(SignalProcessResponse::default())
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let process = self.processes.get(&req.exec_id).map_err(status)?;
        let (status, signal) = match process.wait() {
            Exit::Code(code) => (code, 0),
            Exit::Signal(signal) => (0, signal as u32),
        };
        Ok(WaitProcessResponse {
            status,
            signal,
            ..Default::default()
        })
    }

    fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        let is_init = self.is_init;
        // Answer first; end a moment later.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            if is_init {
                crate::init::reset_vm();
            } else {
                std::process::exit(0);
            }
        });
        Ok(ShutdownResponse::default())
    }
}

impl Agent {
    fn read(&self, req: ReadStreamRequest, stream: Stream) -> ttrpc::Result<ReadStreamResponse> {
        let process = self.processes.get(&req.exec_id).map_err(status)?;
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

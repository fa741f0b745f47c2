//! The agent API shared by the agent (server, in the guest) and the runtime
//! (client, on the host): `proto/agent.proto` and the ttrpc code generated
//! from it, plus small helpers both sides use; and [`errors`], how every
//! crate of the workspace renders an error and its causes as one line.

pub mod errors;
pub mod vmm;

pub use errors::{error_chain, repeated_cause};

use std::os::unix::io::IntoRawFd;
use std::os::unix::net::UnixStream;

/// Messages of `proto/agent.proto`.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_mut,
    unused_results,
    trivial_casts
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// The ttrpc client (`AgentServiceClient`) and server glue
/// (`AgentService`, `create_agent_service`).
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_mut,
    unused_results,
    trivial_casts
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The guest vsock port the agent serves on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The virtio-fs tag of a sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "microvm";

/// Where the agent mounts the sandbox's shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/microvm/shared";

/// How long an agent call that answers at once (create, start, network
/// setup, signal, stats…) may take before the guest counts as stuck.
pub const PROMPT_CALL_SECS: u64 = 30;

/// A call context for agent calls that answer at once: they fail after
/// `seconds` rather than hang on a stuck guest.
pub fn quick_call(seconds: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(std::time::Duration::from_secs(seconds).as_nanos() as i64)
}

/// [`quick_call`] with [`PROMPT_CALL_SECS`].
pub fn prompt_call() -> ttrpc::context::Context {
    quick_call(PROMPT_CALL_SECS)
}

/// A call context without a deadline, for calls that wait on the guest's
/// processes (wait, read stdout); a dead VM ends them by closing the
/// connection.
pub fn unbounded_call() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

/// The next chunk of a process's stdout or (`stderr`) stderr; waits for
/// output, and answers an empty chunk at its end.
pub fn read_output(
    client: &agent_ttrpc::AgentServiceClient,
    request: &agent::ReadStreamRequest,
    stderr: bool,
) -> ttrpc::Result<agent::ReadStreamResponse> {
    if stderr {
        client.read_stderr(unbounded_call(), request)
    } else {
        client.read_stdout(unbounded_call(), request)
    }
}

/// A ttrpc client on an already connected stream (e.g. after the hybrid
/// vsock handshake). The client owns the socket from then on.
pub fn client_from_stream(stream: UnixStream) -> ttrpc::Result<ttrpc::Client> {
    ttrpc::Client::new(stream.into_raw_fd())
}

/// What the agent said went wrong, or what went wrong on the way.
pub fn error_message(error: &ttrpc::Error) -> String {
    match error {
        ttrpc::Error::RpcStatus(status) => status.message().to_string(),
        ttrpc::Error::Others(text) if is_deadline(error) => {
            format!("the guest agent did not answer in time, the guest may be stuck ({text})")
        }
        other => other.to_string(),
    }
}

/// Whether a call failed because its deadline passed without an answer
/// (rather than because the agent refused it or the connection broke).
pub fn is_deadline(error: &ttrpc::Error) -> bool {
    // ttrpc's client gives up on a call's deadline with this text.
    matches!(error, ttrpc::Error::Others(text) if text.contains("Receiver timeout"))
}

/// Whether the agent answered NOT_FOUND (unknown process, missing program).
pub fn is_not_found(error: &ttrpc::Error) -> bool {
    matches!(error, ttrpc::Error::RpcStatus(status) if status.code() == ttrpc::Code::NOT_FOUND)
}

/// A ttrpc error status for the agent to return.
pub fn status(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_carry_code_and_message() {
        let error = status(ttrpc::Code::NOT_FOUND, "nosuch: command not found");
        assert!(is_not_found(&error));
        assert_eq!(error_message(&error), "nosuch: command not found");
        assert!(!is_not_found(&status(ttrpc::Code::INTERNAL, "x")));
    }

    #[test]
    fn messages_round_trip_through_protobuf() {
        use protobuf::Message;
        let request = agent::ExecProcessRequest {
            exec_id: "cmd".into(),
            argv: vec!["echo".into(), "hi".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            ..Default::default()
        };
        let bytes = request.write_to_bytes().unwrap();
        assert_eq!(
            agent::ExecProcessRequest::parse_from_bytes(&bytes).unwrap(),
            request
        );
    }
}

//! The long-lived shim's server, run by hand rather than by the shim
//! library's bootstrap because containerd 1.6 and 1.7 call the task API as
//! `containerd.task.v2.Task`, while the library's generated service is
//! `containerd.task.v3.Task` (containerd 2's name for the same messages):
//! every method is registered under both names.

use std::collections::HashMap;
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Flags, Shim};

use super::service::KataShim;
use super::RUNTIME_ID;

const TASK_V3: &str = "/containerd.task.v3.Task/";
const TASK_V2: &str = "/containerd.task.v2.Task/";

/// Serves the task API on `flags.socket` until the shim is told to exit.
/// Until it serves, what it writes to stderr goes to `start` (its stdout
/// pipe), which passes it on to containerd when the shim fails to come up.
pub fn serve(flags: &Flags) -> Result<()> {
    let stderr = StartupStderr::redirect();
    let result = serve_with(flags, stderr);
    if let Err(e) = &result {
        // Not `{:#}`: errors of the shim library and ttrpc print their
        // cause in their message too; this shows it once.
        eprintln!("{RUNTIME_ID}: {}", protocols::error_chain(&**e));
    }
    result
}

fn serve_with(flags: &Flags, stderr: StartupStderr) -> Result<()> {
    if flags.socket.is_empty() {
        bail!("no -socket to serve on");
    }
    if let Err(e) = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
    {
        eprintln!(
            "{RUNTIME_ID}: logging to containerd: {}",
            protocols::error_chain(&e)
        );
    }
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS (containerd's event socket)")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .with_context(|| format!("connecting to containerd's events at {ttrpc_address}"))?;
    let mut shim = KataShim::new(RUNTIME_ID, flags, &mut containerd_shim::Config::default());
    let task: Arc<dyn containerd_shim_protos::Task + Send + Sync> =
        Arc::new(shim.create_task_service(publisher));
    let mut methods = HashMap::new();
    for (path, handler) in containerd_shim_protos::create_task(task.clone()) {
        methods.insert(path, handler);
    }
    for (path, handler) in containerd_shim_protos::create_task(task) {
        methods.insert(path.replacen(TASK_V3, TASK_V2, 1), handler);
    }

    let path = flags.socket.trim_start_matches("unix://");
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the shim socket directory {}", dir.display()))?;
    }
    let listener = match UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                // The pod's shim serves already: `start` reads its address.
                containerd_shim::util::write_address(&flags.socket)?;
                stderr.release_start();
                return Ok(());
            }
            std::fs::remove_file(path).with_context(|| format!("removing stale socket {path}"))?;
            UnixListener::bind(path).with_context(|| format!("listening on {path}"))?
        }
        Err(e) => return Err(e).with_context(|| format!("listening on {path}")),
    };
    let mut server = ttrpc::Server::new()
        .add_listener(listener.into_raw_fd())
        .context("serving the task API")?
        .register_service(methods)
        // Waits block a worker each; give every outstanding call a thread.
        .set_thread_count_min(4)
        .set_thread_count_default(8)
        .set_thread_count_max(512);
    server.start().context("starting the task API server")?;
    stderr.release_start();
    tracing::info!("shim serving on {}", flags.socket);
    ignore_termination_signals();
    shim.wait();
    server.shutdown();
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// The shim's stderr while it comes up: `start` reads our stdout (a pipe)
/// until it closes and copies it to its own stderr, which containerd shows
/// when `start` fails; the stderr we were given (`/dev/null`) is kept aside.
struct StartupStderr {
    given: libc::c_int,
}

impl StartupStderr {
    /// Points stderr at the `start` pipe.
    fn redirect() -> StartupStderr {
        // SAFETY: dup and dup2 on our own standard descriptors.
        let given = unsafe { libc::dup(libc::STDERR_FILENO) };
        if given >= 0 {
            // SAFETY: as above.
            unsafe { libc::dup2(libc::STDOUT_FILENO, libc::STDERR_FILENO) };
        }
        StartupStderr { given }
    }

    /// Serving: points stdout and stderr back at the given stderr, which
    /// closes the pipe and so ends `start`.
    fn release_start(self) {
        if self.given < 0 {
            return;
        }
        // SAFETY: dup2 and close on descriptors we own.
        unsafe {
            libc::dup2(self.given, libc::STDOUT_FILENO);
            libc::dup2(self.given, libc::STDERR_FILENO);
            libc::close(self.given);
        }
    }
}

/// containerd's SIGTERM to a shim is no order to leave its pod behind: the
/// shim ends through the task API's Shutdown (or dies with SIGKILL).
fn ignore_termination_signals() {
    // SAFETY: setting signal dispositions to SIG_IGN.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
}

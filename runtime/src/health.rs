//! Whether a running guest still answers, as Kata's runtime watches its
//! agent: the agent's `Check`, asked every few seconds while the VM runs.
//!
//! A VMM that dies is noticed by watching its process. A VM whose VMM lives
//! on but whose guest no longer answers (a hung guest kernel, a stopped
//! VMM, a guest starved of CPU for that long) would otherwise leave every
//! wait on it hanging for ever. When one `Check` goes unanswered for the
//! configured limit, the guest counts as stuck and the watcher's owner is
//! told, which kills the VMM: everything waiting on the VM then ends as if
//! it had died.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use protocols::agent::CheckRequest;
use protocols::agent_ttrpc::AgentServiceClient;

/// How often the agent is asked, at most.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A running watch on an agent; dropping it ends the watch.
pub struct AgentWatch {
    _stop: mpsc::Sender<()>,
}

/// Asks the agent behind `client` for a `Check` every [`CHECK_INTERVAL`]
/// (or every half `limit`, if shorter), each with `limit` to answer. The
/// first one left unanswered calls `on_stuck` with the reason and ends the
/// watch; so does a broken connection (the VM is gone or going: its owner
/// learns that elsewhere), without calling it.
pub fn watch_agent(
    client: AgentServiceClient,
    limit: Duration,
    on_stuck: impl FnOnce(String) + Send + 'static,
) -> std::io::Result<AgentWatch> {
    let (stop, stopped) = mpsc::channel::<()>();
    let interval = CHECK_INTERVAL.min(limit / 2);
    let deadline = protocols::quick_call(limit.as_secs().max(1));
    thread::Builder::new()
        .name("agent-health".into())
        .spawn(move || loop {
            match stopped.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            match client.check(deadline.clone(), &CheckRequest::default()) {
                Ok(_) => {}
                Err(e) if protocols::is_deadline(&e) => {
                    // Stopped meanwhile: the VM is being shut down on purpose.
                    if let Err(mpsc::TryRecvError::Empty) = stopped.try_recv() {
                        on_stuck(format!(
                            "the guest agent did not answer a health check for {} s: \
                             the guest is stuck",
                            limit.as_secs().max(1)
                        ));
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!("agent health check: {}", protocols::error_message(&e));
                    return;
                }
            }
        })?;
    Ok(AgentWatch { _stop: stop })
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use protocols::agent::CheckResponse;
    use protocols::agent_ttrpc::{create_agent_service, AgentService};
    use ttrpc::TtrpcContext;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(2);

    fn client(stream: UnixStream) -> AgentServiceClient {
        AgentServiceClient::new(protocols::client_from_stream(stream).unwrap())
    }

    /// A peer that takes requests and answers none: a stuck guest.
    fn silent_agent() -> (AgentServiceClient, thread::JoinHandle<()>) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let sink = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(theirs.read(&mut buf), Ok(n) if n > 0) {}
        });
        (client(ours), sink)
    }

    fn watch(client: AgentServiceClient) -> (AgentWatch, mpsc::Receiver<String>) {
        let (told, stuck) = mpsc::channel();
        let watch = watch_agent(client, LIMIT, move |why| told.send(why).unwrap()).unwrap();
        (watch, stuck)
    }

    #[test]
    fn an_unanswered_check_reports_the_guest_stuck() {
        let (client, _sink) = silent_agent();
        let started = Instant::now();
        let (_watch, stuck) = watch(client);
        let why = stuck.recv_timeout(Duration::from_secs(15)).unwrap();
        assert!(
            why.contains("did not answer a health check for 2 s"),
            "{why}"
        );
        // One interval (half the limit) and the limit.
        assert!(started.elapsed() >= LIMIT, "after {:?}", started.elapsed());
    }

    #[test]
    fn a_stopped_watch_reports_nothing() {
        let (client, _sink) = silent_agent();
        let (watch, stuck) = watch(client);
        drop(watch);
        assert!(stuck.recv_timeout(LIMIT * 3).is_err());
    }

    #[test]
    fn a_closed_connection_is_left_to_the_vm_watch() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let (_watch, stuck) = watch(client(ours));
        assert!(stuck.recv_timeout(LIMIT * 3).is_err());
    }

    /// An agent that answers its checks, counting them.
    #[derive(Default)]
    struct Healthy(AtomicUsize);

    impl AgentService for Healthy {
        fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(CheckResponse::default())
        }
    }

    #[test]
    fn an_answering_agent_is_left_alone() {
        let path = std::env::temp_dir().join(format!("health-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let agent = Arc::new(Healthy::default());
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(create_agent_service(agent.clone()));
        server.start().unwrap();
        let (_watch, stuck) = watch(client(UnixStream::connect(&path).unwrap()));
        assert!(stuck.recv_timeout(LIMIT * 4).is_err());
        // Checked once per interval (a second here), all answered.
        assert!(agent.0.load(Ordering::SeqCst) >= 3, "{:?}", agent.0);
        server.shutdown();
        let _ = std::fs::remove_file(&path);
    }
}

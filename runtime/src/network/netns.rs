//! Netlink inside a network namespace without moving any thread the caller
//! owns: the work runs on a fresh thread that enters the namespace
//! (`setns(CLONE_NEWNET)` is per thread) and ends with it. Netlink and tun
//! sockets belong to the namespace of the thread that creates them, so
//! everything the closure opens lives in that namespace.

use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};

use nix::sched::{setns, CloneFlags};
use rtnetlink::Handle;

use super::NetworkError;

/// What a closure run in a namespace gets.
pub struct Ns {
    /// A netlink connection opened inside the namespace.
    pub handle: Handle,
    /// The namespace, for error messages ("net:[4026532281]", "host").
    pub label: String,
}

impl Ns {
    /// Maps a netlink error of `step` on `link` to a [`NetworkError`].
    pub fn fail<'a>(
        &'a self,
        link: &'a str,
        step: &'static str,
    ) -> impl FnOnce(rtnetlink::Error) -> NetworkError + 'a {
        move |source| NetworkError::Netlink {
            netns: self.label.clone(),
            link: link.to_string(),
            step,
            error: Box::new(source),
        }
    }

    /// An I/O failure of `step` on `link`.
    pub fn io_fail<'a>(
        &'a self,
        link: &'a str,
        step: &'static str,
    ) -> impl FnOnce(std::io::Error) -> NetworkError + 'a {
        move |source| NetworkError::Io {
            netns: self.label.clone(),
            link: link.to_string(),
            step,
            error: source,
        }
    }
}

/// How a namespace file is named in messages: its inode as the kernel
/// shows it (`net:[4026532281]`).
pub fn describe(netns: &File) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", netns.as_raw_fd()))
        .map(|target| target.display().to_string())
        .unwrap_or_else(|_| format!("netns fd {}", netns.as_raw_fd()))
}

/// Runs `work` in the network namespace `netns` (an open
/// `/var/run/netns/...` or `/proc/<pid>/ns/net`) on a thread of its own,
/// with a current-thread tokio runtime and a netlink connection made there.
pub fn run_in<T, F, Fut>(netns: &File, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Ns) -> Fut + Send,
    Fut: Future<Output = Result<T, NetworkError>>,
    T: Send,
{
    let label = describe(netns);
    run_on_thread(Some(netns), label, work)
}

/// Runs `work` in the caller's own network namespace, as [`run_in`] does
/// elsewhere.
pub fn run_here<T, F, Fut>(work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Ns) -> Fut + Send,
    Fut: Future<Output = Result<T, NetworkError>>,
    T: Send,
{
    run_on_thread(None, "host".to_string(), work)
}

fn run_on_thread<T, F, Fut>(netns: Option<&File>, label: String, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Ns) -> Fut + Send,
    Fut: Future<Output = Result<T, NetworkError>>,
    T: Send,
{
    std::thread::scope(|scope| {
        let thread_label = label.clone();
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, move || {
                let label = thread_label;
                if let Some(netns) = netns {
                    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                        NetworkError::EnterNetns {
                            netns: label.clone(),
                            error: errno.into(),
                        }
                    })?;
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(|source| NetworkError::Io {
                        netns: label.clone(),
                        link: String::new(),
                        step: "starting the netlink event loop",
                        error: source,
                    })?;
                runtime.block_on(async move {
                    let (connection, handle, _) =
                        rtnetlink::new_connection().map_err(|source| NetworkError::Io {
                            netns: label.clone(),
                            link: String::new(),
                            step: "opening a netlink socket",
                            error: source,
                        })?;
                    tokio::spawn(connection);
                    work(Ns { handle, label }).await
                })
            });
        match thread {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(NetworkError::Panicked { netns: label })),
            Err(source) => Err(NetworkError::Io {
                netns: label,
                link: String::new(),
                step: "starting the netns thread",
                error: source,
            }),
        }
    })
}

/// A new, anonymous network namespace: a thread unshares one and opens it.
/// It lives as long as the returned file (and whatever sockets or
/// processes are inside it).
pub fn create_anonymous() -> Result<File, NetworkError> {
    let fail = |step: &'static str| {
        move |source: std::io::Error| NetworkError::Io {
            netns: "new".into(),
            link: String::new(),
            step,
            error: source,
        }
    };
    std::thread::Builder::new()
        .name("netns-new".into())
        .spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|errno| fail("unsharing the network namespace")(errno.into()))?;
            File::open("/proc/thread-self/ns/net").map_err(fail("opening /proc/thread-self/ns/net"))
        })
        .map_err(fail("starting the netns thread"))?
        .join()
        .unwrap_or_else(|_| {
            Err(NetworkError::Panicked {
                netns: "new".into(),
            })
        })
}

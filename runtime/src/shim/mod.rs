//! `containerd-shim-kata-v2`: a containerd shim v2 that runs each pod (or
//! each plain `ctr run` container) in its own microVM.
//!
//! - [`service`]: the shim's life (containerd's `start` and `delete`
//!   subcommands, one long-lived shim per pod) and the ttrpc
//!   `containerd.task.v2.Task` service, each call mapped onto the pod;
//! - [`serve`]: the long-lived shim's ttrpc server;
//! - [`pod`]: one pod = one VM: its VMM, the agent connection, its
//!   containers and their processes, what happens when the VM dies;
//! - [`process`]: a process's state as containerd sees it (created,
//!   running, stopped with an exit status and time), with waiters;
//! - [`io`]: a process's stdio between containerd's FIFOs and the agent;
//! - [`mounts`]: a container's rootfs and bind mounts, mounted into the
//!   pod's shared directory (and so into the guest), and unmounted again;
//! - [`spec`]: the OCI spec containerd wrote, rewritten for the guest.
//!
//! Grouping follows Kata: containers whose CRI annotations
//! (`io.kubernetes.cri.container-type=container`,
//! `io.kubernetes.cri.sandbox-id`) name a sandbox reuse that sandbox's
//! shim, and with it its VM.

pub mod io;
pub mod mounts;
pub mod pod;
pub mod process;
pub mod serve;
pub mod service;
pub mod spec;

/// The runtime's name as containerd knows it.
pub const RUNTIME_ID: &str = "io.containerd.kata.v2";

/// Where the shim keeps a pod's state: `<STATE_ROOT>/<namespace>/<pod id>`.
pub const STATE_ROOT: &str = "/run/microvm";

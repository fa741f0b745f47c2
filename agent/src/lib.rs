//! The guest agent: PID 1 of the microVM. It mounts the guest's file systems,
//! reaps every zombie, and serves the agent API (`protocols`) over vsock port
//! 1024: running processes with their stdio streamed to the host, signalling
//! and waiting for them, and shutting the VM down.
//!
//! - [`container`]: OCI containers (create, start, exec, cgroups, ...);
//! - [`init`]: what PID 1 sets up (mounts, hostname) and how it ends the VM;
//! - [`network`]: the guest NIC's name, addresses, routes and neighbours (netlink);
//! - [`oom`]: which processes the guest kernel's OOM killer ended (its log);
//! - [`process`]: processes the agent started, their pipes and exit status;
//! - [`reaper`]: the SIGCHLD thread that collects every child's status;
//! - [`service`]: the ttrpc service mapping requests onto the above.

pub mod container;
pub mod init;
pub mod network;
pub mod oom;
pub mod process;
pub mod reaper;
pub mod service;

//! The host side of microvm: the `microvm` CLI, the containerd shim,
//! the sandbox lifecycle (start the VMM, connect to the agent, tear down) and
//! the configuration.

pub mod beneath;
pub mod cgroup;
pub mod config;
pub mod ctl;
pub mod fd_mount;
pub mod guest_command;
pub mod health;
pub mod hybrid_vsock;
pub mod install;
pub mod mountinfo;
pub mod network;
pub mod oci;
pub mod process_exit;
pub mod sandbox;
pub mod shim;
pub mod shim_config;

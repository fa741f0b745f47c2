//! The host side: the `microvm` CLI, the containerd shim
//! (`containerd-shim-kata-v2`), the sandbox lifecycle (start the VMM, connect to
//! the agent, tear everything down) and the configuration.
//!
//! Not written yet: the next issues fill it in.

//! Builds what a microVM boots from: initramfs archives (newc cpio, written
//! here in Rust, deterministically) and, later, container root file systems.

pub mod busybox;
pub mod cpio;

//! Builds what a microVM boots from and runs: initramfs archives (newc
//! cpio, written here in Rust, deterministically), the default container
//! rootfs (busybox), and container root file systems unpacked from local
//! OCI / docker-archive images.

pub mod busybox;
pub mod cpio;
pub mod default_rootfs;
pub mod image;

//! The virtual machine monitor: a KVM VM with its vCPUs, guest memory, kernel
//! loading, virtio-mmio devices (vsock, fs, blk, net), the serial console and
//! the event loop that drives them. One VMM process runs one microVM.
//!
//! Not written yet: the next issue ("Boot a KVM microVM to our own agent")
//! fills it in.

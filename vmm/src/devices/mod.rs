//! Emulated devices: the legacy PC ones the kernel needs (serial console,
//! i8042 for reset) on port I/O, and virtio devices on MMIO.

pub mod bus;
pub mod i8042;
pub mod manager;
pub mod serial;
pub mod virtio;

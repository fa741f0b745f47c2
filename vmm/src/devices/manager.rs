//! Where the virtio devices of a VM live: each gets the next virtio-mmio
//! slot (a 4 KiB window and an IRQ, see [`layout`]), its queue
//! notifications wired as ioeventfds and its interrupt as an irqfd, a
//! transport on the MMIO bus, and a `virtio_mmio.device=` fragment of the
//! kernel command line (there is no device tree or ACPI to find it by).
//!
//! How a device runs is said where it is attached:
//! - [`MmioDevices::attach_polled`]: its queues and back end are served by
//!   the VM's event loop (the `devices` thread): vsock, virtio-net;
//! - [`MmioDevices::attach_threaded`]: it serves itself on a thread of its
//!   own, started when the device was built: virtio-fs, whose requests
//!   block on the host file system.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::devices::bus::{Bus, BusDevice};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::VirtioDevice;
use crate::layout;

/// The VM's event loop, as `Vm` keeps it.
pub type EventLoop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no virtio-mmio slot is left for the {0} device ({max} at most)", max = layout::VIRTIO_MMIO_SLOTS)]
    NoSlot(&'static str),
    #[error("KVM refused to wire the {device} device's {what}")]
    Kvm {
        device: &'static str,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("placing the {device} device's MMIO window")]
    Bus {
        device: &'static str,
        source: crate::devices::bus::Overlap,
    },
}

/// Where one attached device ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

impl MmioSlot {
    fn of(index: u64) -> MmioSlot {
        MmioSlot {
            base: layout::VIRTIO_MMIO_START + index * layout::VIRTIO_MMIO_SIZE,
            irq: layout::VIRTIO_FIRST_IRQ + index as u32,
        }
    }

    /// How the guest kernel learns of the device.
    pub fn cmdline_fragment(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// The virtio-mmio devices of one VM, in attach order.
pub struct MmioDevices<'a> {
    vm: &'a VmFd,
    memory: &'a GuestMemoryMmap,
    slots: Vec<MmioSlot>,
}

impl<'a> MmioDevices<'a> {
    pub fn new(vm: &'a VmFd, memory: &'a GuestMemoryMmap) -> Self {
        MmioDevices {
            vm,
            memory,
            slots: Vec::new(),
        }
    }

    /// Attaches `device`, served by the event loop `events`.
    pub fn attach_polled<D>(
        &mut self,
        name: &'static str,
        device: D,
        mmio: &mut Bus,
        events: &mut EventLoop,
    ) -> Result<MmioSlot, AttachError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let device = Arc::new(Mutex::new(device));
        let slot = self.attach(name, device.clone(), mmio)?;
        events.add_subscriber(device);
        Ok(slot)
    }

    /// Attaches `device`, which serves its queues on its own thread.
    pub fn attach_threaded<D>(
        &mut self,
        name: &'static str,
        device: D,
        mmio: &mut Bus,
    ) -> Result<MmioSlot, AttachError>
    where
        D: VirtioDevice + 'static,
    {
        self.attach(name, Arc::new(Mutex::new(device)), mmio)
    }

    /// The kernel command line's fragments for every attached device.
    pub fn cmdline(&self) -> impl Iterator<Item = String> + '_ {
        self.slots.iter().map(MmioSlot::cmdline_fragment)
    }

    fn attach<D>(
        &mut self,
        name: &'static str,
        device: Arc<Mutex<D>>,
        mmio: &mut Bus,
    ) -> Result<MmioSlot, AttachError>
    where
        D: VirtioDevice + 'static,
    {
        let index = self.slots.len() as u64;
        if index >= layout::VIRTIO_MMIO_SLOTS {
            return Err(AttachError::NoSlot(name));
        }
        let slot = MmioSlot::of(index);
        let kvm = |what| {
            move |source| AttachError::Kvm {
                device: name,
                what,
                source,
            }
        };
        {
            let locked = device.lock().unwrap_or_else(|e| e.into_inner());
            for (queue, event) in locked.queue_events().iter().enumerate() {
                self.vm
                    .register_ioevent(
                        event,
                        &IoEventAddress::Mmio(slot.base + REG_QUEUE_NOTIFY),
                        queue as u32,
                    )
                    .map_err(kvm("queue notification"))?;
            }
            self.vm
                .register_irqfd(&locked.interrupt().event, slot.irq)
                .map_err(kvm("interrupt"))?;
        }
        let transport: Arc<Mutex<dyn BusDevice>> =
            Arc::new(Mutex::new(MmioTransport::new(self.memory.clone(), device)));
        mmio.insert(slot.base, layout::VIRTIO_MMIO_SIZE, transport)
            .map_err(|source| AttachError::Bus {
                device: name,
                source,
            })?;
        self.slots.push(slot);
        Ok(slot)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_layout() {
        let first = MmioSlot::of(0);
        assert_eq!(first.base, layout::VIRTIO_MMIO_START);
        assert_eq!(first.irq, layout::VIRTIO_FIRST_IRQ);
        let third = MmioSlot::of(2);
        assert_eq!(third.base, layout::VIRTIO_MMIO_START + 2 * 0x1000);
        assert_eq!(
            third.cmdline_fragment(),
            format!(
                "virtio_mmio.device=4K@{:#x}:{}",
                layout::VIRTIO_MMIO_START + 0x2000,
                layout::VIRTIO_FIRST_IRQ + 2
            )
        );
    }
}

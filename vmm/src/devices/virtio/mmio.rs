//! The virtio-mmio transport (virtio spec 1.2, 4.2.2, "modern" version 2):
//! the register window through which the guest driver discovers a device,
//! negotiates features, programs its queues and drives its status.
//!
//! Queue notifications normally never reach this code: the VMM registers
//! each queue's eventfd as a KVM ioeventfd on `QueueNotify`. A write that
//! does arrive here (no ioeventfd) is forwarded to the same eventfd.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::{VirtioDevice, INTERRUPT_CONFIG};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

// Device status bits (virtio spec 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// VIRTIO_F_VERSION_1: every modern device must offer it.
pub const FEATURE_VERSION_1: u64 = 1 << 32;

/// One device's MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    memory: GuestMemoryMmap,
    device_features_select: u32,
    driver_features_select: u32,
    queue_select: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(memory: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        Self {
            device,
            memory,
            device_features_select: 0,
            driver_features_select: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// The driver-visible device status.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.locked().read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            crate::guest_warn!(
                "virtio-mmio: {}-byte read of register {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.locked().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.locked().avail_features() as u32,
                1 => (self.locked().avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.with_queue(|q| q.max_size() as u32).unwrap_or(0),
            REG_QUEUE_READY => self.with_queue(|q| q.ready() as u32).unwrap_or(0),
            REG_INTERRUPT_STATUS => self.locked().interrupt().status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                crate::guest_warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.locked().write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(
                "virtio-mmio: {}-byte write of register {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM => self.configure_queue(|q| q.set_size(value as u16)),
            REG_QUEUE_READY => self.configure_queue(|q| q.set_ready(value == 1)),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => {
                self.locked()
                    .interrupt()
                    .status
                    .fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            REG_QUEUE_DESC_LOW => {
                self.configure_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.configure_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_DRIVER_LOW => {
                self.configure_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.configure_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => {
                self.configure_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.configure_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            _ => crate::guest_warn!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn with_queue<T>(&self, f: impl FnOnce(&virtio_queue::Queue) -> T) -> Option<T> {
        self.locked()
            .queues()
            .get(self.queue_select as usize)
            .map(f)
    }

    /// Queue registers may only change while the driver sets the device up.
    fn configure_queue(&mut self, f: impl FnOnce(&mut virtio_queue::Queue)) {
        let setting_up = self.status
            & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED)
            == (STATUS_DRIVER | STATUS_FEATURES_OK);
        if !setting_up {
            crate::guest_warn!(
                "virtio-mmio: queue register written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let index = self.queue_select as usize;
        if let Some(queue) = self.locked().queues_mut().get_mut(index) {
            f(queue);
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            crate::guest_warn!(
                "virtio-mmio: features written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mut device = self.locked();
        let mask = 0xffff_ffffu64 << shift;
        let acked = (device.acked_features() & !mask)
            | (((value as u64) << shift) & device.avail_features());
        device.set_acked_features(acked);
    }

    fn notify(&self, queue_index: u32) {
        let device = self.locked();
        if let Some(event) = device.queue_events().get(queue_index as usize) {
            if let Err(e) = event.write(1) {
                crate::guest_warn!("virtio-mmio: notifying queue {queue_index}: {e}");
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // The driver only ever adds bits, one step at a time.
        if value & self.status != self.status {
            crate::guest_warn!(
                "virtio-mmio: status {:#x} -> {value:#x} drops bits; ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        match added {
            STATUS_ACKNOWLEDGE if self.status == 0 => self.status = value,
            STATUS_DRIVER if self.status == STATUS_ACKNOWLEDGE => self.status = value,
            STATUS_FEATURES_OK if self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER => {
                // Only accepted when the driver speaks virtio 1.x.
                if self.locked().acked_features() & FEATURE_VERSION_1 != 0 {
                    self.status = value;
                } else {
                    crate::guest_warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
                }
            }
            STATUS_DRIVER_OK
                if self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK =>
            {
                self.status = value;
                self.activate();
            }
            _ => crate::guest_warn!(
                "virtio-mmio: status {:#x} -> {value:#x} out of order; ignored",
                self.status
            ),
        }
    }

    fn activate(&mut self) {
        let memory = self.memory.clone();
        let mut device = self.locked();
        if device.is_activated() {
            return;
        }
        let bad_queue = device
            .queues()
            .iter()
            .position(|queue| !queue.ready() || !queue.is_valid(&memory));
        let result = match bad_queue {
            Some(index) => Err(super::ActivateError::BadQueue {
                index,
                reason: "not ready, or its size or rings are invalid".into(),
            }),
            None => device.activate(memory),
        };
        if let Err(e) = result {
            crate::guest_error!(
                "virtio-mmio: activating device type {}: {e}",
                device.device_type()
            );
            drop(device);
            self.status |= STATUS_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
            let _ = self.locked().interrupt().trigger(INTERRUPT_CONFIG);
        }
    }

    fn reset(&mut self) {
        let mut device = self.locked();
        if device.is_activated() && !device.reset() {
            crate::guest_warn!(
                "virtio-mmio: device type {} cannot be reset",
                device.device_type()
            );
            drop(device);
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        if !device.is_activated() {
            for queue in device.queues_mut() {
                queue.reset();
            }
            device.set_acked_features(0);
        }
        device.interrupt().status.store(0, Ordering::SeqCst);
        drop(device);
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, VirtioState};
    use vm_memory::GuestAddress;

    struct Dummy {
        virtio: VirtioState,
        config: [u8; 8],
        activated: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn avail_features(&self) -> u64 {
            FEATURE_VERSION_1 | 0b101
        }
        fn virtio_state(&self) -> &VirtioState {
            &self.virtio
        }
        fn virtio_state_mut(&mut self) -> &mut VirtioState {
            &mut self.virtio
        }
        fn config_space(&self) -> Vec<u8> {
            self.config.to_vec()
        }
        fn activate(&mut self, _memory: GuestMemoryMmap) -> Result<(), ActivateError> {
            self.activated = true;
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.activated
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = Arc::new(Mutex::new(Dummy {
            virtio: VirtioState::new(1, 16).unwrap(),
            config: *b"\x03\0\0\0\0\0\0\0",
            activated: false,
        }));
        (MmioTransport::new(memory, device.clone()), device)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn identifies_as_a_modern_virtio_device() {
        let (mut t, _) = setup();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 19);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0b101);
        let mut cid = [0u8; 8];
        t.read(CONFIG_SPACE, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 3);
    }

    fn drive_to_features_ok(t: &mut MmioTransport) {
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, 1);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, 0b111); // bit 1 is not offered
        write(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    #[test]
    fn negotiates_features_programs_queues_and_activates() {
        let (mut t, device) = setup();
        drive_to_features_ok(&mut t);
        assert_eq!(
            device.lock().unwrap().virtio.acked_features,
            FEATURE_VERSION_1 | 0b101
        );
        assert_eq!(
            read(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        write(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 16);
        write(&mut t, REG_QUEUE_NUM, 8);
        write(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        write(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        write(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        write(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 1);
        write(&mut t, REG_STATUS, 0xf);
        assert!(device.lock().unwrap().activated);
        assert_eq!(read(&mut t, REG_STATUS), 0xf);
        let queue = &device.lock().unwrap().virtio.queues[0];
        assert_eq!(queue.size(), 8);
        assert_eq!(queue.desc_table(), 0x1000);
    }

    #[test]
    fn refuses_activation_with_an_unready_queue() {
        let (mut t, device) = setup();
        drive_to_features_ok(&mut t);
        write(&mut t, REG_STATUS, 0xf);
        assert!(!device.lock().unwrap().activated);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_ne!(read(&mut t, REG_INTERRUPT_STATUS) & INTERRUPT_CONFIG, 0);
    }

    #[test]
    fn rejects_a_legacy_driver_and_out_of_order_status() {
        let (mut t, _) = setup();
        write(&mut t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // No VERSION_1: FEATURES_OK does not stick.
        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn interrupt_ack_clears_status_bits_and_notify_reaches_the_queue_event() {
        let (mut t, device) = setup();
        device
            .lock()
            .unwrap()
            .virtio
            .interrupt
            .trigger(0b11)
            .unwrap();
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0b11);
        write(&mut t, REG_INTERRUPT_ACK, 0b01);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0b10);
        write(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(
            device.lock().unwrap().virtio.queue_events[0]
                .read()
                .unwrap(),
            1
        );
    }
}

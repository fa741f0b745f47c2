//! The MMIO transport target: a guest driver reading and writing any
//! register of a device's virtio-mmio window (any offset, any access size,
//! any value, in any order: features, queue programming with ring addresses
//! anywhere, status transitions, resets, config space), now and then doing
//! a driver's whole setup with fuzzed features so the device gets
//! activated, and then using its queues. The devices are the real vsock
//! device (Unix sockets in a scratch directory) and the real net device (on
//! a socket pair standing in for its tap), on their own event loop.
//!
//! Checked: the identification registers never change; the status and
//! interrupt status hold only defined bits; the used rings (see
//! [`Driver::check_used`]); no descriptor outlives the device.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::driver::{guest_memory, Driver, QUEUE_LEN};
use super::{net, run_until_idle, Input, ScratchDir};
use crate::devices::virtio::mmio::{
    MmioTransport, FEATURE_VERSION_1, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const INTERRUPT_STATUS: u64 = 0x060;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const CONFIG: u64 = 0x100;

/// Every register of the window (virtio 1.2, 4.2.2), and the config space.
const REGISTERS: [u64; 24] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100,
];
const STATUS_BITS: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

/// Runs the MMIO target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    if input.bool() {
        let dir = ScratchDir::new("mmio").expect("a scratch directory");
        let vsock = Vsock::new(3, dir.path().join("v.sock")).expect("the vsock device");
        drive(vsock, &mut input);
    } else {
        let (net, _peer) = net::fake_net(1500);
        drive(net, &mut input);
    }
}

fn drive<D: VirtioDevice + MutEventSubscriber + 'static>(device: D, input: &mut Input) {
    let queues = device.queues().len();
    let memory = guest_memory();
    let mut driver = Driver::new(&memory, queues);
    let device = Arc::new(Mutex::new(device));
    let mut events = EventManager::new().expect("an event manager");
    events.add_subscriber(device.clone());
    let transport_device: Arc<Mutex<dyn VirtioDevice>> = device.clone();
    let mut transport = MmioTransport::new(memory.clone(), transport_device);

    while !input.is_empty() {
        match input.u8() % 8 {
            0 | 1 => {
                let offset = register(input);
                let value = match input.u8() % 4 {
                    // A ring address of one of the queues.
                    0 => {
                        let (desc, avail, used) = driver.ring_addresses(input.u8() as usize);
                        input.pick(&[desc, avail, used]) as u32
                    }
                    _ => input.u32(),
                };
                let size = input.pick(&[4usize, 4, 4, 1, 2, 8, 0, 3]);
                let bytes = [value.to_le_bytes(), [0; 4]].concat();
                transport.write(offset, &bytes[..size]);
                if offset == STATUS {
                    driver.mark_tampered();
                }
            }
            2 => {
                let offset = register(input);
                let size = input.pick(&[4usize, 4, 1, 2, 8, 0]);
                let mut data = [0u8; 8];
                transport.read(offset, &mut data[..size]);
            }
            3 => {
                setup(&mut transport, &driver, queues, input);
                driver.mark_tampered();
            }
            4 => {
                let queue = input.u8() as usize % queues;
                driver.post_fuzzed(queue, input);
            }
            5 => {
                let queue = input.u8() as usize % queues;
                driver.tamper(queue, input);
            }
            _ => {
                let queue = input.u8() as usize % queues;
                // QueueNotify: as KVM's ioeventfd does, or through the
                // transport when it has none.
                if input.bool() {
                    transport.write(0x050, &(queue as u32).to_le_bytes());
                } else {
                    let _ = device.lock().unwrap().queue_events()[queue].write(1);
                }
                run_until_idle(&mut events);
            }
        }
        check(&mut transport, &driver);
    }
    run_until_idle(&mut events);
    check(&mut transport, &driver);
}

/// A register offset: mostly a defined one, else any in or past the window.
fn register(input: &mut Input) -> u64 {
    let choice = input.u8();
    if choice >= 224 {
        return u64::from(input.u16());
    }
    match REGISTERS[choice as usize % REGISTERS.len()] {
        CONFIG => CONFIG + u64::from(input.u8()),
        register => register,
    }
}

/// A driver's setup (virtio 1.2, 3.1.1) with fuzzed features: reset,
/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK, every queue programmed at
/// its ring addresses, DRIVER_OK. Some steps may be skipped.
fn setup(transport: &mut MmioTransport, driver: &Driver, queues: usize, input: &mut Input) {
    let skip = input.u8();
    let features = if skip & 1 != 0 { input.u64() } else { u64::MAX } | FEATURE_VERSION_1;
    let write = |transport: &mut MmioTransport, offset: u64, value: u32| {
        transport.write(offset, &value.to_le_bytes());
    };
    write(transport, STATUS, 0);
    write(transport, STATUS, STATUS_ACKNOWLEDGE);
    write(transport, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write(transport, DEVICE_FEATURES_SEL, 1);
    write(transport, DRIVER_FEATURES_SEL, 0);
    write(transport, DRIVER_FEATURES, features as u32);
    write(transport, DRIVER_FEATURES_SEL, 1);
    write(transport, DRIVER_FEATURES, (features >> 32) as u32);
    write(
        transport,
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    for queue in 0..queues {
        if skip & 2 != 0 && queue == 0 {
            continue;
        }
        let (desc, avail, used) = driver.ring_addresses(queue);
        write(transport, QUEUE_SEL, queue as u32);
        let size = if skip & 4 != 0 {
            u32::from(input.u16())
        } else {
            u32::from(QUEUE_LEN)
        };
        write(transport, QUEUE_NUM, size);
        for (low, address) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, avail),
            (QUEUE_DEVICE_LOW, used),
        ] {
            write(transport, low, address as u32);
            write(transport, low + 4, (address >> 32) as u32);
        }
        write(transport, QUEUE_READY, 1);
    }
    if skip & 8 == 0 {
        write(
            transport,
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }
}

/// What reads of the window must always show.
fn check(transport: &mut MmioTransport, driver: &Driver) {
    let mut read = |offset: u64| {
        let mut data = [0u8; 4];
        transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    };
    assert_eq!(read(MAGIC), 0x7472_6976, "MagicValue");
    assert_eq!(read(VERSION), 2, "Version");
    let status = read(STATUS);
    assert_eq!(status & !STATUS_BITS, 0, "status {status:#x}");
    let interrupt = read(INTERRUPT_STATUS);
    assert_eq!(interrupt & !3, 0, "interrupt status {interrupt:#x}");
    driver.check_all_used();
}

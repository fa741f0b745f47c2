//! The virtio-fs device's event loop, on its own thread: it waits (epoll)
//! on the queues' notifications (the ioeventfds KVM signals) and a stop
//! event, drains each notified queue through the FUSE server, returns the
//! chains used and interrupts the guest (once per pass over the ring; with
//! EVENT_IDX only when the driver asked to be told). It runs apart from the VMM's
//! shared event loop because file I/O blocks.
//!
//! Nothing is allocated per request here (the FUSE server's `Reader` and
//! `Writer` allocate their small scatter lists, and the passthrough file
//! system its own bookkeeping).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::memory_view::{FuseMemory, FuseQueue};
use super::server::{serve_chain, FsServer};
use super::NUM_QUEUES;
use crate::devices::virtio::{Interrupt, INTERRUPT_USED_RING};

/// The epoll token of the stop event (queue events use their index).
const STOP: u64 = u64::MAX;

/// The running event loop of one activated device.
pub struct EventHandler {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// What the event loop owns.
pub struct QueueState {
    pub memory: FuseMemory,
    pub queues: Vec<FuseQueue>,
    /// One per queue: the ioeventfd the driver's notifications arrive on.
    pub events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    pub server: Arc<FsServer>,
    /// Set once a queue's avail ring turned out to be corrupt: it is no
    /// longer served (the driver must reset the device).
    pub broken: [bool; NUM_QUEUES],
}

impl EventHandler {
    pub fn start(state: QueueState) -> io::Result<EventHandler> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (index, event) in state.events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, index as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let mut state = state;
        let thread = std::thread::Builder::new()
            .name("virtio-fs".into())
            .spawn(move || state.run(&epoll))?;
        Ok(EventHandler {
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the loop (device reset) and waits for it: a request being
    /// served completes first.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("virtio-fs: stopping its thread: {e}");
                return;
            }
            let _ = thread.join();
        }
    }
}

impl Drop for EventHandler {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl QueueState {
    fn run(&mut self, epoll: &Epoll) {
        let mut ready = [EpollEvent::default(); NUM_QUEUES + 1];
        loop {
            let count = match epoll.wait(-1, &mut ready) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-fs: waiting for requests: {e}");
                    return;
                }
            };
            for event in &ready[..count] {
                match event.data() {
                    STOP => return,
                    index => {
                        let index = index as usize;
                        if let Some(event) = self.events.get(index) {
                            // Clears the counter; the queue is drained below.
                            let _ = event.read();
                            self.process_queue(index);
                        }
                    }
                }
            }
        }
    }

    /// Serves every request waiting on queue `index`, interrupting the
    /// guest after each pass over the ring if it needs to be told.
    pub fn process_queue(&mut self, index: usize) {
        if self.broken.get(index).copied().unwrap_or(true) {
            return;
        }
        let memory = &self.memory;
        let queue = &mut self.queues[index];
        let mut empty_passes = 0;
        loop {
            // Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY: the driver
            // need not kick while we are draining.
            let _ = queue.disable_notification(memory);
            let mut served = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(memory) {
                let head = chain.head_index();
                let used = serve_chain(&self.server, memory, chain);
                if let Err(e) = queue.add_used(memory, head, used) {
                    tracing::error!("virtio-fs: returning buffer {head}: {e}");
                }
                served += 1;
            }
            // Completions are announced once per pass over the ring.
            if served > 0 && queue.needs_notification(memory).unwrap_or(true) {
                if let Err(e) = self.interrupt.trigger(INTERRUPT_USED_RING) {
                    tracing::error!("virtio-fs: raising the interrupt: {e}");
                }
            }
            match queue.enable_notification(memory) {
                // More arrived while notifications were off.
                Ok(true) => {
                    // The avail index says there is work, yet twice in a
                    // row nothing could be popped: the ring is corrupt
                    // (an index beyond the queue size). Stop serving it
                    // rather than spin.
                    empty_passes = if served == 0 { empty_passes + 1 } else { 0 };
                    if empty_passes >= 2 {
                        tracing::error!(
                            "virtio-fs: queue {index}'s available ring is corrupt; \
                             not serving it until the device is reset"
                        );
                        self.broken[index] = true;
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::error!("virtio-fs: re-enabling notifications on queue {index}: {e}");
                    break;
                }
            }
        }
    }
}

//! The virtio-fs device's event loop, on a thread of its own: it waits
//! (epoll) on the queues' notifications (the ioeventfds KVM signals) and a
//! stop event, drains each notified queue through the FUSE server, returns
//! the chains used and interrupts the guest (once per pass over the ring;
//! with EVENT_IDX only when the driver asked to be told). It runs apart
//! from the VMM's shared event loop because file I/O blocks.
//!
//! The thread is started with the device, before the VMM confines its
//! threads, and lives as long as the device: it confines itself (the
//! `Fs` seccomp list) and then serves each activation of the device in
//! turn. Starting it at activation instead would make it a child of the
//! vCPU thread that activates, bound by the vCPU's list as well.
//!
//! Nothing is allocated per request here (the FUSE server's `Reader` and
//! `Writer` allocate their small scatter lists, and the passthrough file
//! system its own bookkeeping).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use fuse_virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::memory_view::{FuseMemory, FuseQueue};
use super::server::{serve_chain, FsServer};
use super::NUM_QUEUES;
use crate::devices::virtio::{Interrupt, INTERRUPT_USED_RING};
use crate::jail::{self, ThreadKind};

/// The epoll token of the stop event (queue events use their index).
const STOP: u64 = u64::MAX;

/// The device's server thread: idle until an activation hands it the
/// queues, serving them until the device is reset.
pub struct Worker {
    /// An activation's queues, to serve until `stop`.
    jobs: Option<mpsc::Sender<QueueState>>,
    stop: Arc<EventFd>,
    /// One message per activation served to its end.
    done: mpsc::Receiver<()>,
    serving: bool,
    thread: Option<JoinHandle<()>>,
}

/// What the event loop owns while the device is active.
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

impl Worker {
    /// Starts the thread; it has confined itself when this returns.
    pub fn spawn() -> io::Result<Worker> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let (jobs, job_rx) = mpsc::channel::<QueueState>();
        let (done_tx, done) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("virtio-fs".into())
            .spawn(move || {
                if let Err(e) = jail::confine_thread(ThreadKind::Fs) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                while let Ok(mut state) = job_rx.recv() {
                    match state.epoll(&thread_stop) {
                        Ok(epoll) => state.run(&epoll, &thread_stop),
                        Err(e) => crate::guest_error!("virtio-fs: watching the queues: {e}"),
                    }
                    drop(state);
                    if done_tx.send(()).is_err() {
                        return;
                    }
                }
            })?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(io::Error::other(protocols::error_chain(&e))),
            Err(_) => return Err(io::Error::other("the virtio-fs thread ended at its start")),
        }
        Ok(Worker {
            jobs: Some(jobs),
            stop,
            done,
            serving: false,
            thread: Some(thread),
        })
    }

    /// Serves an activation's queues until [`Worker::stop_serving`].
    pub fn serve(&mut self, state: QueueState) -> io::Result<()> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("no thread"))?;
        jobs.send(state)
            .map_err(|_| io::Error::other("the virtio-fs thread has ended"))?;
        self.serving = true;
        Ok(())
    }

    pub fn is_serving(&self) -> bool {
        self.serving
    }

    /// Ends the activation being served (device reset) and waits for it:
    /// a request being served completes first.
    pub fn stop_serving(&mut self) {
        if !self.serving {
            return;
        }
        self.serving = false;
        if let Err(e) = self.stop.write(1) {
            crate::guest_error!("virtio-fs: stopping its thread: {e}");
            return;
        }
        let _ = self.done.recv();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_serving();
        // Closing the job channel ends the thread.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl QueueState {
    /// An epoll set over the queue notifications and `stop`.
    fn epoll(&self, stop: &EventFd) -> io::Result<Epoll> {
        let epoll = Epoll::new()?;
        for (index, event) in self.events.iter().enumerate() {
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
        Ok(epoll)
    }

    fn run(&mut self, epoll: &Epoll, stop: &EventFd) {
        let mut ready = [EpollEvent::default(); NUM_QUEUES + 1];
        loop {
            let count = match epoll.wait(-1, &mut ready) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::guest_error!("virtio-fs: waiting for requests: {e}");
                    return;
                }
            };
            jail::test_violation(ThreadKind::Fs);
            for event in &ready[..count] {
                match event.data() {
                    STOP => {
                        let _ = stop.read();
                        return;
                    }
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
                    crate::guest_error!("virtio-fs: returning buffer {head}: {e}");
                }
                served += 1;
            }
            // Completions are announced once per pass over the ring.
            if served > 0 && queue.needs_notification(memory).unwrap_or(true) {
                if let Err(e) = self.interrupt.trigger(INTERRUPT_USED_RING) {
                    crate::guest_error!("virtio-fs: raising the interrupt: {e}");
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
                        crate::guest_error!(
                            "virtio-fs: queue {index}'s available ring is corrupt; \
                             not serving it until the device is reset"
                        );
                        self.broken[index] = true;
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    crate::guest_error!(
                        "virtio-fs: re-enabling notifications on queue {index}: {e}"
                    );
                    break;
                }
            }
        }
    }
}

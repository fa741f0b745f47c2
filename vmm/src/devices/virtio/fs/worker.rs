//! The thread that serves virtio-fs requests: it waits on the queues'
//! notifications (the ioeventfds), hands each descriptor chain to the FUSE
//! server, returns it used with the reply's length and interrupts the
//! guest. It runs apart from the device event loop because file I/O blocks.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use fuse_virtio_queue::QueueT;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::EventFd;

use super::memory_view::{FuseMemory, FuseQueue};
use super::FsServer;
use crate::devices::virtio::{Interrupt, INTERRUPT_USED_RING};

pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

struct State {
    memory: FuseMemory,
    queues: Vec<FuseQueue>,
    events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    server: Arc<FsServer>,
}

impl Worker {
    pub fn start(
        memory: FuseMemory,
        queues: Vec<FuseQueue>,
        events: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
        server: Arc<FsServer>,
    ) -> io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_clone = stop.try_clone()?;
        let mut state = State {
            memory,
            queues,
            events,
            interrupt,
            server,
        };
        let thread = std::thread::Builder::new()
            .name("virtio-fs".into())
            .spawn(move || state.run(stop_clone))?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the thread (device reset) and waits for it.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn borrow(event: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd belongs to `event`, which outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) }
}

impl State {
    fn run(&mut self, stop: EventFd) {
        loop {
            let mut fds: Vec<PollFd> = self
                .events
                .iter()
                .map(|e| PollFd::new(borrow(e), PollFlags::POLLIN))
                .collect();
            fds.push(PollFd::new(borrow(&stop), PollFlags::POLLIN));
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!("virtio-fs: poll: {e}");
                    return;
                }
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            if ready[self.events.len()] {
                return;
            }
            for (index, ready) in ready[..self.events.len()].iter().enumerate() {
                if *ready {
                    let _ = self.events[index].read();
                    self.serve(index);
                }
            }
        }
    }

    /// Serves every request waiting on queue `index`.
    fn serve(&mut self, index: usize) {
        let memory = &self.memory;
        let queue = &mut self.queues[index];
        loop {
            // With EVENT_IDX off this simply loops until the ring is empty.
            let _ = queue.disable_notification(memory);
            let mut served_any = false;
            while let Some(chain) = queue.pop_descriptor_chain(memory) {
                let head = chain.head_index();
                let used = match (
                    Reader::from_descriptor_chain(memory, chain.clone()),
                    VirtioFsWriter::new(memory, chain),
                ) {
                    (Ok(reader), Ok(writer)) => {
                        match self
                            .server
                            .handle_message(reader, writer.into(), None, None)
                        {
                            Ok(len) => len as u32,
                            Err(e) => {
                                tracing::debug!("virtio-fs: request failed: {e:?}");
                                0
                            }
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!("virtio-fs: a malformed descriptor chain: {e:?}");
                        0
                    }
                };
                if let Err(e) = queue.add_used(memory, head, used) {
                    tracing::error!("virtio-fs: returning a buffer: {e:?}");
                }
                served_any = true;
            }
            if served_any && queue.needs_notification(memory).unwrap_or(true) {
                if let Err(e) = self.interrupt.trigger(INTERRUPT_USED_RING) {
                    tracing::error!("virtio-fs: raising the interrupt: {e}");
                }
            }
            match queue.enable_notification(memory) {
                // New requests arrived while notifications were off.
                Ok(true) => continue,
                _ => return,
            }
        }
    }
}

//! The vsock device's event-loop glue: which fds it watches and what each
//! event means. Guest notifications (queue eventfds) and host sockets both
//! end in moving packets between the queues and the muxer.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::muxer::{EVENT_HOST_STREAM, EVENT_LISTENER};
use super::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.virtio.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                crate::guest_error!("vsock: watching queue {index}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            self.muxer.listener(),
            EVENT_LISTENER,
            EventSet::IN,
        )) {
            crate::guest_error!("vsock: watching the host socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            index
                if index as usize == RX_QUEUE
                    || index as usize == TX_QUEUE
                    || index as usize == EVENT_QUEUE =>
            {
                let _ = self.virtio.queue_events[index as usize].read();
                // Nothing is ever sent on the event queue (no transport resets).
            }
            EVENT_LISTENER => self.muxer.accept(ops),
            EVENT_HOST_STREAM => self.muxer.host_event(events.fd(), events.event_set(), ops),
            other => crate::guest_warn!("vsock: event with unknown tag {other}"),
        }
        // Whatever happened, the guest may have sent packets or freed rx
        // buffers, and the host side may have data, replies or credit for it.
        self.process_tx(ops);
        self.process_rx(ops);
    }
}

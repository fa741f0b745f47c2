//! The virtio-net device's event-loop glue (on the VMM's shared `devices`
//! loop): the queues' notifications and the tap's readiness.
//!
//! The tap is watched edge-triggered: level-triggered, a tap holding frames
//! while the guest has no RX buffers would wake the loop forever. The device
//! remembers readiness instead (`tap_readable`) and resumes reading on the
//! guest's next RX kick.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{Net, RX_QUEUE, TX_QUEUE};

/// The tap's event tag (queue events are tagged with their index).
pub const TAP_EVENT: u32 = 2;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.virtio.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                crate::guest_error!("virtio-net: watching queue {index}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.tap,
            TAP_EVENT,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )) {
            crate::guest_error!("virtio-net: watching tap {}: {e:?}", self.tap.name());
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            index if index as usize == RX_QUEUE => {
                // New RX buffers: worth it only if the tap has frames.
                let _ = self.virtio.queue_events[RX_QUEUE].read();
                self.process_rx();
            }
            index if index as usize == TX_QUEUE => {
                let _ = self.virtio.queue_events[TX_QUEUE].read();
                self.process_tx();
            }
            TAP_EVENT => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    crate::guest_warn!(
                        "virtio-net: tap {} reports {:?}",
                        self.tap.name(),
                        events.event_set()
                    );
                }
                // A read tells what is really there (EAGAIN clears it again).
                self.tap_readable = true;
                self.process_rx();
            }
            other => crate::guest_warn!("virtio-net: event with unknown tag {other}"),
        }
    }
}

//! The event bus: jobs publish QEMU's events (`JOB_STATUS_CHANGE`,
//! `BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED`, ...) with QEMU's data; the
//! control layer subscribes and sends them to QMP clients with a
//! timestamp. Publishing never blocks a job.

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// One event: QEMU's name and its `data` member.
#[derive(Clone, Debug, PartialEq)]
pub struct JobEvent {
    pub name: &'static str,
    pub data: Value,
}

#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<UnboundedSender<JobEvent>>>,
}

impl EventBus {
    /// Every event published from now on, in order.
    pub fn subscribe(&self) -> UnboundedReceiver<JobEvent> {
        let (tx, rx) = unbounded_channel();
        self.subscribers.lock().push(tx);
        rx
    }

    pub(crate) fn publish(&self, name: &'static str, data: Value) {
        let event = JobEvent { name, data };
        tracing::debug!(event = name, data = %event.data, "job event");
        // Subscribers that went away are dropped here.
        self.subscribers
            .lock()
            .retain(|s| s.send(event.clone()).is_ok());
    }
}

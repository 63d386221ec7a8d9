//! The event bus in memory: the fake of the EventBridge publisher, recording what was published and
//! failing on demand (a publish that fails leaves the events in their outboxes).

use std::sync::Mutex;

use super::lock;
use crate::events::{EventError, RelayEvent};
use crate::ports::EventPublisher;

/// Published events, in order.
#[derive(Debug)]
pub struct MemEvents {
    /// Everything published (tests inspect it).
    pub published: Mutex<Vec<RelayEvent>>,
    /// How many of the next `publish` calls fail (publishing nothing).
    pub fail_next: Mutex<usize>,
    enabled: bool,
}

impl Default for MemEvents {
    fn default() -> Self {
        Self::new()
    }
}

impl MemEvents {
    /// A bus that accepts everything.
    pub fn new() -> Self {
        Self {
            published: Mutex::default(),
            fail_next: Mutex::new(0),
            enabled: true,
        }
    }

    /// No bus configured: nothing is written to outboxes.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::new()
        }
    }

    /// Make the next `n` publish calls fail.
    pub fn fail_next(&self, n: usize) {
        *lock(&self.fail_next) = n;
    }

    /// A copy of what was published.
    pub fn published(&self) -> Vec<RelayEvent> {
        lock(&self.published).clone()
    }
}

impl EventPublisher for MemEvents {
    fn enabled(&self) -> bool {
        self.enabled
    }

    async fn publish(&self, events: &[RelayEvent]) -> Result<(), EventError> {
        {
            let mut fail = lock(&self.fail_next);
            if *fail > 0 {
                *fail -= 1;
                return Err(EventError::Publish("bus unavailable (fake)".into()));
            }
        }
        lock(&self.published).extend(events.iter().cloned());
        Ok(())
    }
}

//! [`EventPublisher`] over EventBridge (`PutEvents` on the relay's bus, `RELAY_EVENT_BUS`): each
//! event one entry, `source` [`SOURCE`], its `detail-type`, `detail` the JSON of
//! [`crate::events::relay_event`]. At most 10 entries per call, in order; a call that refuses an
//! entry fails as a whole (the outbox keeps every event and publishes them again, same ids).

use aws_sdk_eventbridge::types::PutEventsRequestEntry;

use super::aws_error::classify;
use crate::events::{EventError, RelayEvent, SOURCE};
use crate::ports::EventPublisher;

/// Entries per `PutEvents` call (EventBridge's limit).
pub const MAX_ENTRIES: usize = 10;

/// The relay's event bus.
#[derive(Debug, Clone)]
pub struct EventBridgePublisher {
    client: aws_sdk_eventbridge::Client,
    bus: Option<String>,
}

impl EventBridgePublisher {
    /// Publish on `bus` (`None`: no bus configured, nothing is published or written to outboxes).
    pub fn new(client: aws_sdk_eventbridge::Client, bus: Option<String>) -> Self {
        Self { client, bus }
    }
}

impl EventPublisher for EventBridgePublisher {
    fn enabled(&self) -> bool {
        self.bus.is_some()
    }

    async fn publish(&self, events: &[RelayEvent]) -> Result<(), EventError> {
        let Some(bus) = &self.bus else {
            return Ok(());
        };
        for chunk in events.chunks(MAX_ENTRIES) {
            let mut entries = Vec::with_capacity(chunk.len());
            for ev in chunk {
                let detail = serde_json::to_string(&ev.detail)
                    .map_err(|e| EventError::Encode(format!("{}: {e}", ev.id)))?;
                entries.push(
                    PutEventsRequestEntry::builder()
                        .event_bus_name(bus)
                        .source(SOURCE)
                        .detail_type(&ev.detail_type)
                        .detail(detail)
                        .build(),
                );
            }
            let out = self
                .client
                .put_events()
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| EventError::Publish(format!("PutEvents {bus}: {}", classify(&e).detail)))?;
            let failed = usize::try_from(out.failed_entry_count()).unwrap_or(0);
            if failed > 0 {
                let detail = out
                    .entries()
                    .iter()
                    .find_map(|e| {
                        e.error_code()
                            .map(|c| format!("{c}: {}", e.error_message().unwrap_or("")))
                    })
                    .unwrap_or_default();
                return Err(EventError::Partial {
                    failed,
                    total: chunk.len(),
                    detail,
                });
            }
        }
        Ok(())
    }
}

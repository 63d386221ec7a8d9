//! Writing upload records with their state-change events (issue 14): every state change goes
//! through [`set_state`] (an event in the record's outbox when a bus is configured,
//! `RELAY_EVENT_BUS`) and every write through [`save`] / [`save_transition`], which store the
//! record and its events in one write and then forget the events written — so none is written
//! twice, and none published before the change it records is stored.

use shared::events::{record_upload_state, set_upload_state};
use shared::model::{UploadRecord, UploadState};
use shared::ports::{RepoError, UploadStore};
use time::OffsetDateTime;

use crate::deps::Deps;

/// Set `up`'s state to `to` now (recorded as an event when events are published).
pub fn set_state<D: Deps>(d: &D, up: &mut UploadRecord, to: UploadState) {
    set_upload_state(up, to, OffsetDateTime::now_utc(), d.tunables().publish_events);
}

/// Record that `up` was just planned (its first event: `null` → its state), when events are
/// published.
pub fn planned<D: Deps>(d: &D, up: &mut UploadRecord) {
    if d.tunables().publish_events {
        record_upload_state(up, None, up.created_at);
    }
}

/// Write `up` with its unwritten events ([`UploadStore::put_upload`]).
pub async fn save<D: Deps>(d: &D, up: &mut UploadRecord) -> Result<(), RepoError> {
    d.repo().put_upload(up).await?;
    up.outbox.written();
    Ok(())
}

/// Write `up` with its unwritten events if the stored state is `expected`
/// ([`UploadStore::transition_upload`]).
pub async fn save_transition<D: Deps>(
    d: &D,
    up: &mut UploadRecord,
    expected: UploadState,
) -> Result<(), RepoError> {
    d.repo().transition_upload(up, expected).await?;
    up.outbox.written();
    Ok(())
}

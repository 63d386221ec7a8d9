//! The poller's store in memory: the fake of
//! [`DynamoTracking`](crate::adapters::dynamodb::DynamoTracking), behind the same ports and with
//! the same rules — tracking records, per-user pending sets, links, feed health, the run lease,
//! batched writes, a user's final records, FINISH_UNCERTAIN uploads and the reconcile scan mark.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

use super::lock;
use super::records::{MemRepo, RepoState};
use crate::model::{FeedHealth, ImageLink, TrackingRecord, UploadEvent, UploadRecord, UploadState};
use crate::ports::{
    Outbox, OutboxStore, PendingTracking, ReconcileStore, RepoError, RunLease, TrackingReader, TrackingStore,
    WebhookQueue,
};
use crate::webhook::WebhookDelivery;

/// Who holds the run lease, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The holder.
    pub owner: String,
    /// End of the lease, epoch ms (held up to and including it).
    pub until_ms: i128,
}

/// Everything the poller's store holds.
#[derive(Debug, Default, Clone)]
pub struct TrackingState {
    /// Tracking records by upload id.
    pub records: BTreeMap<String, TrackingRecord>,
    /// Each user's pending set: the upload ids a run looks at.
    pub pending: BTreeMap<String, BTreeSet<String>>,
    /// Links by (upload id, index).
    pub links: BTreeMap<(String, u32), ImageLink>,
    /// Feed health.
    pub health: Option<FeedHealth>,
    /// The run lease.
    pub lease: Option<LeaseState>,
    /// When the last complete FINISH_UNCERTAIN scan ran.
    pub scan_mark: Option<OffsetDateTime>,
    /// FINISH_UNCERTAIN uploads taken out of the index ([`ReconcileStore::resolve_uncertain`]).
    pub uncertain_resolved: BTreeSet<String>,
    /// `put_tracking_batch` calls (a run writes each user's records in one).
    pub batches: usize,
    /// Queued webhook deliveries by (user, queue key).
    pub webhook_queue: BTreeMap<(String, String), WebhookDelivery>,
}

/// The poller's items in memory. FINISH_UNCERTAIN uploads are zip-and-push's upload records:
/// build the store with [`MemTracking::over`] a [`MemRepo`] to see them (in DynamoDB both live in
/// the UploadsTable); [`MemTracking::new`] has an empty uploads table of its own.
#[derive(Debug, Default)]
pub struct MemTracking {
    /// The data (tests may inspect and edit it).
    pub state: Mutex<TrackingState>,
    uploads: Arc<Mutex<RepoState>>,
}

fn epoch_ms(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos() / 1_000_000
}

impl MemTracking {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose FINISH_UNCERTAIN uploads are those of `repo`.
    pub fn over(repo: &MemRepo) -> Self {
        Self {
            state: Mutex::default(),
            uploads: Arc::clone(&repo.state),
        }
    }

    /// A copy of the data.
    pub fn snapshot(&self) -> TrackingState {
        lock(&self.state).clone()
    }
}

impl TrackingState {
    /// Replace each named upload's links with the given ones (the last one given for an index
    /// wins), as the adapter rewrites an upload's links items whole.
    fn replace_links(&mut self, links: &[ImageLink]) {
        let uploads: BTreeSet<&str> = links.iter().map(|l| l.upload_id.as_str()).collect();
        self.links.retain(|(u, _), _| !uploads.contains(u.as_str()));
        for l in links {
            self.links.insert((l.upload_id.clone(), l.index), l.clone());
        }
    }

    fn add_pending(&mut self, user_id: &str, upload_id: &str) {
        self.pending
            .entry(user_id.to_string())
            .or_default()
            .insert(upload_id.to_string());
    }

    fn remove_pending(&mut self, user_id: &str, upload_id: &str) {
        if let Some(set) = self.pending.get_mut(user_id) {
            set.remove(upload_id);
        }
    }
}

impl TrackingReader for MemTracking {
    async fn get_tracking(&self, upload_id: &str) -> Result<Option<TrackingRecord>, RepoError> {
        Ok(lock(&self.state).records.get(upload_id).cloned())
    }

    async fn list_links(&self, upload_id: &str) -> Result<Vec<ImageLink>, RepoError> {
        Ok(lock(&self.state)
            .links
            .iter()
            .filter(|((u, _), _)| u == upload_id)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn get_feed_health(&self) -> Result<Option<FeedHealth>, RepoError> {
        Ok(lock(&self.state).health.clone())
    }
}

impl TrackingStore for MemTracking {
    async fn create_tracking(&self, record: &TrackingRecord) -> Result<bool, RepoError> {
        let mut st = lock(&self.state);
        let created = !st.records.contains_key(&record.upload_id);
        if created {
            st.records.insert(record.upload_id.clone(), record.clone());
        }
        // As the adapter: also for an existing record (its set membership is repaired).
        if !record.tracked.state.is_final() {
            st.add_pending(&record.user_id, &record.upload_id);
        }
        Ok(created)
    }

    async fn update_tracking(
        &self,
        record: &TrackingRecord,
        expected_last_checked_at: Option<OffsetDateTime>,
    ) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        match st.records.get(&record.upload_id) {
            Some(old) if old.tracked.last_checked_at == expected_last_checked_at => {}
            Some(_) => {
                return Err(RepoError::ConditionFailed(format!(
                    "tracking {} was checked since {expected_last_checked_at:?}",
                    record.upload_id
                )))
            }
            None => {
                return Err(RepoError::ConditionFailed(format!(
                    "tracking {} does not exist",
                    record.upload_id
                )))
            }
        }
        st.records.insert(record.upload_id.clone(), record.clone());
        if record.tracked.state.is_final() {
            st.remove_pending(&record.user_id, &record.upload_id);
        } else {
            st.add_pending(&record.user_id, &record.upload_id);
        }
        Ok(())
    }

    async fn list_pending_tracking(&self) -> Result<PendingTracking, RepoError> {
        let mut st = lock(&self.state);
        let TrackingState { records, pending, .. } = &mut *st;
        let mut out = Vec::new();
        for (user, ids) in pending.iter_mut() {
            ids.retain(|id| match records.get(id) {
                Some(r) if !r.tracked.state.is_final() && &r.user_id == user => {
                    out.push(r.clone());
                    true
                }
                // Final (its removal from the set did not happen) or gone: tidied.
                _ => false,
            });
        }
        pending.retain(|_, ids| !ids.is_empty());
        out.sort_by(|a, b| (&a.user_id, &a.upload_id).cmp(&(&b.user_id, &b.upload_id)));
        Ok(PendingTracking {
            records: out,
            unreadable: Vec::new(),
        })
    }

    async fn put_links(&self, links: &[ImageLink]) -> Result<(), RepoError> {
        lock(&self.state).replace_links(links);
        Ok(())
    }

    async fn put_tracking_batch(
        &self,
        records: &[TrackingRecord],
        links: &[ImageLink],
        clear_pending_of: Option<&str>,
    ) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        st.batches += 1;
        st.replace_links(links);
        for r in records {
            st.records.insert(r.upload_id.clone(), r.clone());
        }
        if let Some(user) = clear_pending_of {
            st.pending.remove(user);
        }
        // Records written non-final keep whatever set membership they had (as the adapter does).
        for r in records.iter().filter(|r| r.tracked.state.is_final()) {
            st.remove_pending(&r.user_id, &r.upload_id);
        }
        Ok(())
    }

    async fn put_feed_health(&self, health: &FeedHealth) -> Result<(), RepoError> {
        lock(&self.state).health = Some(health.clone());
        Ok(())
    }

    async fn user_linked_sequences(&self, user_id: &str) -> Result<HashSet<String>, RepoError> {
        Ok(lock(&self.state)
            .records
            .values()
            .filter(|r| r.user_id == user_id && r.tracked.state.is_final())
            .flat_map(|r| r.sequence_ids.iter().cloned())
            .collect())
    }
}

impl OutboxStore for MemTracking {
    async fn list_outbox(&self) -> Result<Outbox, RepoError> {
        Ok(Outbox {
            tracking: lock(&self.state)
                .records
                .values()
                .filter(|r| !r.pending_events.is_empty())
                .cloned()
                .collect(),
            uploads: lock(&self.uploads).upload_events.values().cloned().collect(),
        })
    }

    async fn upload_outbox(&self, upload_id: &str) -> Result<Vec<UploadEvent>, RepoError> {
        Ok(lock(&self.uploads)
            .upload_events
            .values()
            .filter(|e| e.upload.upload_id == upload_id)
            .cloned()
            .collect())
    }

    async fn ack_upload_events(&self, events: &[UploadEvent]) -> Result<(), RepoError> {
        let mut st = lock(&self.uploads);
        for ev in events {
            st.upload_events
                .remove(&(ev.upload.upload_id.clone(), ev.position));
        }
        Ok(())
    }

    async fn ack_outbox(&self, record: &TrackingRecord) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        match st.records.get(&record.upload_id) {
            Some(old) if old.tracked.last_checked_at == record.tracked.last_checked_at => {
                st.records.insert(record.upload_id.clone(), record.clone());
                Ok(())
            }
            _ => Err(RepoError::ConditionFailed(format!(
                "tracking {} changed since its outbox was read",
                record.upload_id
            ))),
        }
    }
}

fn queue_key(d: &WebhookDelivery) -> (String, String) {
    let micros = d.enqueued_at.unix_timestamp_nanos() / 1000;
    (d.user_id.clone(), format!("{micros:020}#{}", d.event_id))
}

impl WebhookQueue for MemTracking {
    async fn enqueue_webhooks(&self, deliveries: &[WebhookDelivery]) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        for d in deliveries {
            st.webhook_queue.insert(queue_key(d), d.clone());
        }
        Ok(())
    }

    async fn list_webhook_queue(&self) -> Result<Vec<WebhookDelivery>, RepoError> {
        Ok(lock(&self.state).webhook_queue.values().cloned().collect())
    }

    async fn remove_webhook_delivery(&self, d: &WebhookDelivery) -> Result<(), RepoError> {
        lock(&self.state).webhook_queue.remove(&queue_key(d));
        Ok(())
    }
}

impl RunLease for MemTracking {
    async fn acquire_run_lease(
        &self,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, RepoError> {
        let mut st = lock(&self.state);
        let free = match &st.lease {
            None => true,
            Some(l) => l.until_ms < epoch_ms(now) || l.owner == owner,
        };
        if free {
            st.lease = Some(LeaseState {
                owner: owner.to_string(),
                until_ms: epoch_ms(until),
            });
        }
        Ok(free)
    }

    async fn release_run_lease(&self, owner: &str) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        if st.lease.as_ref().is_some_and(|l| l.owner == owner) {
            st.lease = None;
        }
        Ok(())
    }
}

impl ReconcileStore for MemTracking {
    async fn finish_uncertain_uploads(&self) -> Result<Vec<UploadRecord>, RepoError> {
        let mut out: Vec<UploadRecord> = lock(&self.uploads)
            .uploads
            .values()
            .filter(|u| u.state == UploadState::FinishUncertain)
            .cloned()
            .collect();
        let resolved = &lock(&self.state).uncertain_resolved;
        out.retain(|u| !resolved.contains(&u.upload_id));
        // The adapter's order: the index's sort key `<user_id>#<upload_id>`.
        out.sort_by_key(|u| format!("{}#{}", u.user_id, u.upload_id));
        Ok(out)
    }

    async fn resolve_uncertain(&self, upload: &UploadRecord) -> Result<(), RepoError> {
        lock(&self.state)
            .uncertain_resolved
            .insert(upload.upload_id.clone());
        Ok(())
    }

    async fn reconcile_scan_mark(&self) -> Result<Option<OffsetDateTime>, RepoError> {
        Ok(lock(&self.state).scan_mark)
    }

    async fn set_reconcile_scan_mark(&self, at: OffsetDateTime) -> Result<(), RepoError> {
        lock(&self.state).scan_mark = Some(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;
    use time::Duration;

    use super::*;
    use crate::domain::linking::{ImageOutcome, LinkPath};
    use crate::domain::tracking::FeedErrorClass;
    use crate::domain::tracking::{OverallState, TrackedUpload};
    use crate::fakes::records::tests::upload_record;
    use crate::ports::UploadStore;

    fn start() -> OffsetDateTime {
        datetime!(2026-03-01 10:00:00 UTC)
    }

    fn record(user: &str, upload: &str) -> TrackingRecord {
        TrackingRecord::new(
            user.into(),
            "s".into(),
            upload.into(),
            TrackedUpload::new(format!("c-{upload}"), start()),
            Some(2),
        )
    }

    fn finished(user: &str, upload: &str) -> TrackingRecord {
        let mut r = record(user, upload);
        r.tracked.state = OverallState::Finished;
        r
    }

    fn ids(v: Vec<TrackingRecord>) -> Vec<String> {
        v.into_iter().map(|r| r.upload_id).collect()
    }

    fn link(upload: &str, i: u32) -> ImageLink {
        ImageLink {
            upload_id: upload.into(),
            index: i,
            key: format!("img {i}.jpg"),
            outcome: ImageOutcome::Linked {
                image_id: format!("{}", 1000 + i),
                sequence_id: "seqA".into(),
                link: format!("https://www.mapillary.com/app/?pKey={}", 1000 + i),
            },
            via: LinkPath::ActivityFeed,
        }
    }

    // The same rules `tests/tests/poller.rs` asserts against DynamoDB.
    #[tokio::test]
    async fn the_run_lease_keeps_one_holder_until_it_expires() {
        let t = MemTracking::new();
        let now = start();
        let minute = Duration::minutes(1);
        assert!(t.acquire_run_lease("first", now, now + minute).await.unwrap());
        assert!(!t.acquire_run_lease("second", now, now + minute).await.unwrap());
        // Held up to and including its last millisecond.
        assert!(!t
            .acquire_run_lease("second", now + minute, now + minute * 2)
            .await
            .unwrap());
        // The holder renews; releasing a lease one does not hold changes nothing.
        assert!(t.acquire_run_lease("first", now, now + minute * 2).await.unwrap());
        t.release_run_lease("second").await.unwrap();
        assert!(!t
            .acquire_run_lease("second", now + minute, now + minute * 3)
            .await
            .unwrap());
        // Released: the next run takes it at once.
        t.release_run_lease("first").await.unwrap();
        assert!(t
            .acquire_run_lease("third", now, now + Duration::seconds(1))
            .await
            .unwrap());
        // An expired lease is taken over.
        let later = now + Duration::seconds(5);
        assert!(t
            .acquire_run_lease("fourth", later, later + minute)
            .await
            .unwrap());
        t.release_run_lease("third").await.unwrap();
        assert!(!t.acquire_run_lease("fifth", later, later + minute).await.unwrap());
        t.release_run_lease("fourth").await.unwrap();
        assert_eq!(t.snapshot().lease, None);
    }

    #[tokio::test]
    async fn pending_sets_follow_the_records() {
        let t = MemTracking::new();
        for (u, id) in [("pat", "p1"), ("pat", "p2"), ("pat", "p3"), ("quin", "q1")] {
            assert!(t.create_tracking(&record(u, id)).await.unwrap());
        }
        assert!(!t.create_tracking(&record("pat", "p1")).await.unwrap());
        assert_eq!(
            ids(t.list_pending_tracking().await.unwrap().records),
            ["p1", "p2", "p3", "q1"]
        );
        assert_eq!(t.get_tracking("p2").await.unwrap(), Some(record("pat", "p2")));

        // Final in a batch: out of the set; a non-final record of the batch stays listed.
        t.put_tracking_batch(&[finished("pat", "p2"), record("pat", "p3")], &[], None)
            .await
            .unwrap();
        assert_eq!(
            ids(t.list_pending_tracking().await.unwrap().records),
            ["p1", "p3", "q1"]
        );
        assert_eq!(t.get_tracking("p2").await.unwrap(), Some(finished("pat", "p2")));

        // A final record back in its set (a re-delivered cluster message) is tidied by the
        // listing, and its record is not reset.
        let q1 = finished("quin", "q1");
        t.update_tracking(&q1, None).await.unwrap();
        assert!(!t.create_tracking(&record("quin", "q1")).await.unwrap());
        t.create_tracking(&record("quin", "q2")).await.unwrap();
        assert_eq!(
            ids(t.list_pending_tracking().await.unwrap().records),
            ["p1", "p3", "q2"]
        );
        assert_eq!(t.get_tracking("q1").await.unwrap(), Some(q1));
        assert!(!t.snapshot().pending["quin"].contains("q1"));

        // Every remaining upload of pat final: the user's set goes with them.
        t.put_tracking_batch(&[finished("pat", "p1"), finished("pat", "p3")], &[], Some("pat"))
            .await
            .unwrap();
        assert_eq!(ids(t.list_pending_tracking().await.unwrap().records), ["q2"]);
        assert!(!t.snapshot().pending.contains_key("pat"));
        assert_eq!(t.snapshot().batches, 2);

        // A user's final records name the sequences linked to them.
        let mut linked = finished("pat", "p4");
        linked.sequence_ids = vec!["seqA".into(), "seqB".into()];
        let mut open = record("pat", "p5");
        open.sequence_ids = vec!["seqC".into()];
        t.put_tracking_batch(&[linked, open], &[], None).await.unwrap();
        let seqs = t.user_linked_sequences("pat").await.unwrap();
        assert_eq!(seqs, HashSet::from(["seqA".to_string(), "seqB".to_string()]));
        assert!(t.user_linked_sequences("quin").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn updates_are_conditional_on_the_last_check() {
        let t = MemTracking::new();
        let r = record("pat", "p1");
        assert!(matches!(
            t.update_tracking(&r, None).await,
            Err(RepoError::ConditionFailed(_))
        ));
        t.create_tracking(&r).await.unwrap();
        let mut checked = r.clone();
        checked.tracked.last_checked_at = Some(start());
        t.update_tracking(&checked, None).await.unwrap();
        // The stored record was checked since: a writer that read it before loses.
        assert!(matches!(
            t.update_tracking(&r, None).await,
            Err(RepoError::ConditionFailed(_))
        ));
        t.update_tracking(&finished("pat", "p1"), Some(start()))
            .await
            .unwrap();
        assert!(t.list_pending_tracking().await.unwrap().records.is_empty());
    }

    #[tokio::test]
    async fn links_of_an_upload_are_replaced_whole() {
        let t = MemTracking::new();
        let mut many: Vec<_> = (0..450).rev().map(|i| link("p1", i)).collect();
        many.push(link("p1", 7)); // the same index twice: one link
        many.push(link("p2", 0));
        t.put_links(&many).await.unwrap();
        assert_eq!(
            t.list_links("p1").await.unwrap(),
            (0..450).map(|i| link("p1", i)).collect::<Vec<_>>()
        );
        t.put_links(&(0..10).map(|i| link("p1", i)).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(
            t.list_links("p1").await.unwrap(),
            (0..10).map(|i| link("p1", i)).collect::<Vec<_>>()
        );
        assert_eq!(t.list_links("p2").await.unwrap(), [link("p2", 0)]);
        assert!(t.list_links("p3").await.unwrap().is_empty());
        // A batch writes its links too.
        t.put_tracking_batch(&[record("pat", "p3")], &[link("p3", 1)], None)
            .await
            .unwrap();
        assert_eq!(t.list_links("p3").await.unwrap(), [link("p3", 1)]);
    }

    #[tokio::test]
    async fn finish_uncertain_uploads_come_from_the_shared_uploads_table() {
        let repo = MemRepo::new();
        let t = MemTracking::over(&repo);
        assert!(t.finish_uncertain_uploads().await.unwrap().is_empty());
        let upload = |user: &str, id: &str, state: UploadState| UploadRecord {
            state,
            // The index is the id's last digit: one sequence, several uploads.
            index: id.chars().last().and_then(|c| c.to_digit(10)).unwrap_or(0),
            ..upload_record(user, "s", id)
        };
        repo.put_upload(&upload("zed", "z.s.000", UploadState::FinishUncertain))
            .await
            .unwrap();
        repo.put_upload(&upload("amy", "a.s.001", UploadState::FinishUncertain))
            .await
            .unwrap();
        repo.put_upload(&upload("amy", "a.s.002", UploadState::HandedOff))
            .await
            .unwrap();
        let found: Vec<String> = t
            .finish_uncertain_uploads()
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.upload_id)
            .collect();
        assert_eq!(found, ["a.s.001", "z.s.000"]);
        // A store of its own sees no uploads.
        assert!(MemTracking::new()
            .finish_uncertain_uploads()
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn the_scan_mark_and_feed_health_read_back() {
        let t = MemTracking::new();
        assert_eq!(t.reconcile_scan_mark().await.unwrap(), None);
        t.set_reconcile_scan_mark(start()).await.unwrap();
        assert_eq!(t.reconcile_scan_mark().await.unwrap(), Some(start()));
        assert_eq!(t.get_feed_health().await.unwrap(), None);
        let h = FeedHealth {
            healthy: false,
            degraded_since: Some(start()),
            last_error: Some("GraphQL error".into()),
            last_error_class: Some(FeedErrorClass::Unusable),
            users_web_app_token: 0,
            users_user_token: 0,
            users_coverage_tiles: 2,
            updated_at: start(),
        };
        t.put_feed_health(&h).await.unwrap();
        assert_eq!(t.get_feed_health().await.unwrap(), Some(h));
    }
}

//! [`WebhookQueue`] on the poller's tracking adapter (UploadsTable).
//!
//! Item pk `WEBHOOK#<user_id>`, sk `<enqueued at, Unix µs, 20 digits>#<event id>`: `doc` (S, the
//! [`WebhookDelivery`] as JSON), `expires_at` (N, the table's TTL: a delivery nobody could take in
//! [`QUEUE_TTL_DAYS`] goes), and gsi1 `WEBHOOK_QUEUE` / `<user_id>#<sk>` so one query lists every
//! queued delivery by user and in queue order.

use super::super::batch::batch_write;
use super::super::item::{key, n, put_request, repo_error, s, string_of};
use super::DynamoTracking;
use crate::ports::{RepoError, WebhookQueue};
use crate::webhook::WebhookDelivery;

/// gsi1 partition of queued deliveries.
pub const WEBHOOK_QUEUE_GSI1PK: &str = "WEBHOOK_QUEUE";
/// Queued deliveries expire after this many days (also when the webhook stays disabled).
pub const QUEUE_TTL_DAYS: i64 = 14;

fn pk(user_id: &str) -> String {
    format!("WEBHOOK#{user_id}")
}

fn sk(d: &WebhookDelivery) -> String {
    let micros = d.enqueued_at.unix_timestamp_nanos() / 1000;
    format!("{micros:020}#{}", d.event_id)
}

impl WebhookQueue for DynamoTracking {
    async fn enqueue_webhooks(&self, deliveries: &[WebhookDelivery]) -> Result<(), RepoError> {
        let mut requests = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let doc = serde_json::to_string(d)
                .map_err(|e| RepoError::Other(format!("encoding a webhook delivery: {e}")))?;
            let mut item = key(pk(&d.user_id), sk(d));
            item.insert("doc".into(), s(doc));
            item.insert("gsi1pk".into(), s(WEBHOOK_QUEUE_GSI1PK));
            item.insert("gsi1sk".into(), s(format!("{}#{}", d.user_id, sk(d))));
            let expires = d.enqueued_at + time::Duration::days(QUEUE_TTL_DAYS);
            item.insert("expires_at".into(), n(expires.unix_timestamp()));
            requests.push(put_request(item)?);
        }
        batch_write(&self.client, &self.table, requests, 1)
            .await
            .map_err(|f| f.into_repo("BatchWriteItem webhook deliveries"))
    }

    async fn list_webhook_queue(&self) -> Result<Vec<WebhookDelivery>, RepoError> {
        let mut out = Vec::new();
        for item in self.gsi1_partition(WEBHOOK_QUEUE_GSI1PK).await? {
            let doc = string_of(&item, "doc").ok_or_else(|| {
                RepoError::Corrupt(format!(
                    "webhook delivery {} has no doc",
                    string_of(&item, "sk").unwrap_or("?")
                ))
            })?;
            out.push(
                serde_json::from_str(doc)
                    .map_err(|e| RepoError::Corrupt(format!("webhook delivery: {e}")))?,
            );
        }
        Ok(out)
    }

    async fn remove_webhook_delivery(&self, d: &WebhookDelivery) -> Result<(), RepoError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(pk(&d.user_id), sk(d))))
            .send()
            .await
            .map_err(|e| repo_error(&e, "DeleteItem webhook delivery"))?;
        Ok(())
    }
}

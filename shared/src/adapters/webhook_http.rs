//! Webhook delivery over HTTP(S): resolve the URL's host, refuse it unless every address passes the
//! SSRF policy ([`crate::webhook::check_resolved`]), then POST to exactly the checked addresses (the
//! request's DNS is pinned, so a second lookup cannot swap in a private address), with no redirects
//! followed and a timeout.

use std::net::{IpAddr, SocketAddr};

use secrecy::SecretString;

use crate::webhook::{
    check_resolved, check_url, sign, DeliveryError, WebhookDelivery, WebhookPolicy, WebhookUrlError,
    EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};

/// `raw` checked ([`check_url`]), resolved, and every address checked ([`check_resolved`]).
pub async fn resolve_checked(
    raw: &str,
    allow_local: bool,
) -> Result<(url::Url, Vec<SocketAddr>), WebhookUrlError> {
    let url = check_url(raw, allow_local)?;
    let host = url
        .host_str()
        .ok_or_else(|| WebhookUrlError::Malformed("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| WebhookUrlError::Malformed("no port".into()))?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| WebhookUrlError::Unresolvable(format!("{host}: {e}")))?
        .collect();
    let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    check_resolved(&url, &ips, allow_local)?;
    Ok((url, addrs))
}

/// POSTs deliveries under a [`WebhookPolicy`].
#[derive(Debug, Clone)]
pub struct WebhookSender {
    policy: WebhookPolicy,
}

impl WebhookSender {
    /// A sender under `policy`.
    pub fn new(policy: WebhookPolicy) -> Self {
        Self { policy }
    }

    /// The policy (backoff, failures, local mode).
    pub fn policy(&self) -> &WebhookPolicy {
        &self.policy
    }

    /// POST `delivery` to `url`, signed with `secret` at `timestamp` (Unix seconds). Only a 2xx
    /// answer is a success.
    pub async fn deliver(
        &self,
        url: &str,
        secret: &SecretString,
        delivery: &WebhookDelivery,
        timestamp: i64,
    ) -> Result<(), DeliveryError> {
        let (url, addrs) = resolve_checked(url, self.policy.allow_local).await?;
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.policy.timeout)
            .connect_timeout(self.policy.timeout);
        if let Some(url::Host::Domain(domain)) = url.host() {
            builder = builder.resolve_to_addrs(domain, &addrs);
        }
        let client = builder
            .build()
            .map_err(|e| DeliveryError::Request(format!("building the client: {e}")))?;
        let body = delivery.body.as_bytes().to_vec();
        let signature = sign(secret, timestamp, &body);
        let resp = client
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", "mapillary-relay-webhook/1")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .header(EVENT_ID_HEADER, &delivery.event_id)
            .header(EVENT_TYPE_HEADER, &delivery.detail_type)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // reqwest's error may quote the URL (the user's own); never the secret or the body.
                DeliveryError::Request(if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "could not connect".to_string()
                } else {
                    e.without_url().to_string()
                })
            })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(DeliveryError::Status(status))
        }
    }
}

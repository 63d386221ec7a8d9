//! A webhook receiver on loopback for the tests and the demo: records every POST the poller
//! delivers, verifies its signature with the secret `PUT /v1/webhook` returned (as a real receiver
//! would: HMAC-SHA256 over `timestamp + "." + body`), and can be taken "down" (it then answers
//! 503, so deliveries fail and back off) and brought back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use secrecy::SecretString;
use serde_json::Value;
use shared::webhook::{verify, EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// One POST the receiver accepted.
#[derive(Debug, Clone)]
pub struct Received {
    /// `X-Relay-Event-Id`.
    pub event_id: String,
    /// `X-Relay-Event-Type`.
    pub event_type: String,
    /// The body as JSON.
    pub body: Value,
    /// Whether the signature verified with the registered secret (and the body's id matches the
    /// header).
    pub verified: bool,
}

#[derive(Default)]
struct Inner {
    secret: Mutex<Option<SecretString>>,
    received: Mutex<Vec<Received>>,
    refused: Mutex<usize>,
    down: AtomicBool,
}

/// The receiver (stops with its task when dropped… or with the process).
#[derive(Clone)]
pub struct WebhookReceiver {
    inner: Arc<Inner>,
    /// `http://127.0.0.1:<port>/hook`.
    pub url: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn hook(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if inner.down.load(Ordering::SeqCst) {
        *lock(&inner.refused) += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let event_id = h(EVENT_ID_HEADER);
    let verified = match (lock(&inner.secret).as_ref(), h(TIMESTAMP_HEADER).parse::<i64>()) {
        (Some(secret), Ok(ts)) => {
            verify(secret, ts, &body, &h(SIGNATURE_HEADER)) && json["id"].as_str() == Some(event_id.as_str())
        }
        _ => false,
    };
    lock(&inner.received).push(Received {
        event_id,
        event_type: h(EVENT_TYPE_HEADER),
        body: json,
        verified,
    });
    StatusCode::NO_CONTENT
}

impl WebhookReceiver {
    /// Listen on a free loopback port.
    pub async fn start() -> Result<Self> {
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the webhook receiver")?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            inner,
            url: format!("http://{addr}/hook"),
        })
    }

    /// The secret signatures are verified with (`PUT /v1/webhook`'s answer).
    pub fn set_secret(&self, secret: &str) {
        *lock(&self.inner.secret) = Some(SecretString::from(secret.to_string()));
    }

    /// Answer 503 to everything (`true`) or accept again (`false`).
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// Everything accepted so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner.received).clone()
    }

    /// POSTs answered 503 while down.
    pub fn refused(&self) -> usize {
        *lock(&self.inner.refused)
    }
}

//! A minimal AWS Lambda Runtime API on a free loopback port, for starting a packaged `bootstrap`
//! the way Lambda starts it (`cargo xtask package`).
//!
//! The four routes a custom runtime uses (API version `2018-06-01`):
//! * `GET  /2018-06-01/runtime/invocation/next` — long-polls until an invocation is queued with
//!   [`RuntimeApi::invoke`], then answers its payload with the headers the runtime reads:
//!   `Lambda-Runtime-Aws-Request-Id`, `Lambda-Runtime-Deadline-Ms` (now + the function's timeout),
//!   `Lambda-Runtime-Invoked-Function-Arn` and `Lambda-Runtime-Trace-Id`;
//! * `POST /2018-06-01/runtime/invocation/{id}/response` and `…/{id}/error` — the outcome of an
//!   invocation handed out (unknown ids get 400, as from Lambda);
//! * `POST /2018-06-01/runtime/init/error` — the runtime failed before its first poll.
//!
//! Everything the function does is reported in arrival order through [`RuntimeApi::observe`], each
//! with the instant it arrived, so the caller can time cold init (process start → first `next`) and
//! the response (payload handed out → response or error posted).
//!
//! axum rather than hand-written HTTP: lambda_runtime's client uses keep-alive and may send its
//! bodies chunked, which hyper handles for us.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Mutex};

/// Header carrying the invocation's request id.
pub const REQUEST_ID: &str = "lambda-runtime-aws-request-id";
/// Header carrying the invocation's deadline, milliseconds since the Unix epoch.
pub const DEADLINE_MS: &str = "lambda-runtime-deadline-ms";
/// Header carrying the ARN the function was invoked by.
pub const FUNCTION_ARN: &str = "lambda-runtime-invoked-function-arn";
/// Header carrying the X-Ray trace header.
pub const TRACE_ID: &str = "lambda-runtime-trace-id";
/// Header a runtime sets on error posts (e.g. `Runtime.InitError`, `unhandled`).
pub const ERROR_TYPE: &str = "lambda-runtime-function-error-type";

/// Largest response payload Lambda accepts from a synchronous invocation (6 MB).
const MAX_RESPONSE_BYTES: usize = 6 * 1024 * 1024;

/// What the function did, as the API saw it.
#[derive(Debug)]
pub enum Observed {
    /// A `GET …/invocation/next` arrived: the runtime finished its initialisation and waits for work.
    NextRequested(Instant),
    /// An invocation was handed out to a `next` request.
    Delivered {
        /// Its request id.
        request_id: String,
        /// When the answer was produced.
        at: Instant,
    },
    /// `POST …/invocation/{id}/response`.
    Response {
        /// The invocation's request id.
        request_id: String,
        /// When the post arrived.
        at: Instant,
        /// The response payload.
        body: Bytes,
    },
    /// `POST …/invocation/{id}/error`.
    Error {
        /// The invocation's request id.
        request_id: String,
        /// When the post arrived.
        at: Instant,
        /// The `Lambda-Runtime-Function-Error-Type` header, if any.
        error_type: Option<String>,
        /// The error document (`{"errorType": …, "errorMessage": …}`).
        body: Bytes,
    },
    /// `POST …/init/error`.
    InitError {
        /// When the post arrived.
        at: Instant,
        /// The `Lambda-Runtime-Function-Error-Type` header, if any.
        error_type: Option<String>,
        /// The error document.
        body: Bytes,
    },
    /// A request the API refused (unknown request id, oversized response, unknown route).
    Refused {
        /// Method, path and why.
        what: String,
    },
}

/// One queued invocation.
struct Invocation {
    request_id: String,
    payload: Bytes,
    timeout: Duration,
}

#[derive(Clone)]
struct Shared {
    queue: Arc<Mutex<mpsc::Receiver<Invocation>>>,
    observed: mpsc::UnboundedSender<Observed>,
    function_arn: Arc<str>,
    /// Request ids handed out and not yet answered.
    in_flight: Arc<std::sync::Mutex<HashSet<String>>>,
    traces: Arc<AtomicU64>,
}

impl Shared {
    fn observe(&self, what: Observed) {
        // The receiver only goes away with the RuntimeApi, when nobody is interested any more.
        let _ = self.observed.send(what);
    }

    /// Removes `id` from the in-flight set; whether it was there.
    fn finish(&self, id: &str) -> bool {
        match self.in_flight.lock() {
            Ok(mut set) => set.remove(id),
            Err(poisoned) => poisoned.into_inner().remove(id),
        }
    }
}

/// The Runtime API server; stops when dropped.
pub struct RuntimeApi {
    addr: SocketAddr,
    invocations: mpsc::Sender<Invocation>,
    observed: mpsc::UnboundedReceiver<Observed>,
    server: tokio::task::JoinHandle<()>,
    next_request: u64,
}

impl RuntimeApi {
    /// Serves the API on `127.0.0.1:<free port>` for a function invoked as `function_arn`.
    pub async fn start(function_arn: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Runtime API listener")?;
        let addr = listener.local_addr()?;
        let (invocations, queue) = mpsc::channel(16);
        let (observed_tx, observed) = mpsc::unbounded_channel();
        let shared = Shared {
            queue: Arc::new(Mutex::new(queue)),
            observed: observed_tx,
            function_arn: function_arn.into(),
            in_flight: Arc::default(),
            traces: Arc::default(),
        };
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route("/2018-06-01/runtime/invocation/{id}/response", post(response))
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .fallback(unknown_route)
            .with_state(shared);
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("runtime-api: server stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            invocations,
            observed,
            server,
            next_request: 0,
        })
    }

    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Queues `payload` for the next `next` request; the function gets `timeout` to answer (its
    /// deadline header). Returns the invocation's request id.
    pub async fn invoke(&mut self, payload: Bytes, timeout: Duration) -> Result<String> {
        self.next_request += 1;
        let request_id = request_id(self.next_request);
        self.invocations
            .send(Invocation {
                request_id: request_id.clone(),
                payload,
                timeout,
            })
            .await
            .context("the Runtime API server has stopped")?;
        Ok(request_id)
    }

    /// The next thing the function did (`None` once the server is gone).
    pub async fn observe(&mut self) -> Option<Observed> {
        self.observed.recv().await
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A UUID-shaped request id, unique within this process.
fn request_id(n: u64) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
        (nanos >> 32) as u32,
        (nanos >> 16) as u16,
        std::process::id() & 0xfff,
        n
    )
}

/// An X-Ray trace header as Lambda passes it (`Root=1-<epoch secs hex>-<24 hex>;Parent=…;Sampled=0`).
fn trace_header(n: u64) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("Root=1-{secs:08x}-{n:024x};Parent={n:016x};Sampled=0")
}

fn header(value: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(value).ok()
}

async fn next(State(s): State<Shared>) -> Response {
    s.observe(Observed::NextRequested(Instant::now()));
    // One poller at a time takes the queue, like Lambda's one invocation per execution environment.
    let invocation = s.queue.lock().await.recv().await;
    let Some(inv) = invocation else {
        // The RuntimeApi was dropped: nothing more will come.
        return (StatusCode::GONE, "runtime API shutting down").into_response();
    };
    let deadline_ms = SystemTime::now()
        .checked_add(inv.timeout)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let trace = trace_header(s.traces.fetch_add(1, Ordering::Relaxed) + 1);
    let mut headers = HeaderMap::new();
    let pairs = [
        (REQUEST_ID, inv.request_id.as_str()),
        (DEADLINE_MS, &deadline_ms.to_string()),
        (FUNCTION_ARN, &s.function_arn),
        (TRACE_ID, &trace),
        ("content-type", "application/json"),
    ];
    for (name, value) in pairs {
        if let Some(v) = header(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    match s.in_flight.lock() {
        Ok(mut set) => set.insert(inv.request_id.clone()),
        Err(poisoned) => poisoned.into_inner().insert(inv.request_id.clone()),
    };
    s.observe(Observed::Delivered {
        request_id: inv.request_id,
        at: Instant::now(),
    });
    (StatusCode::OK, headers, inv.payload).into_response()
}

/// Lambda's answer to a post it refuses (`{"errorMessage", "errorType"}`).
fn refuse(s: &Shared, status: StatusCode, error_type: &str, what: String) -> Response {
    s.observe(Observed::Refused { what: what.clone() });
    (
        status,
        Json(json!({"errorMessage": what, "errorType": error_type})),
    )
        .into_response()
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, Json(json!({"status": "OK"}))).into_response()
}

fn error_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(ERROR_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn response(State(s): State<Shared>, Path(id): Path<String>, body: Bytes) -> Response {
    let at = Instant::now();
    if !s.finish(&id) {
        return refuse(
            &s,
            StatusCode::BAD_REQUEST,
            "InvalidRequestID",
            format!("POST response for unknown request id {id:?}"),
        );
    }
    if body.len() > MAX_RESPONSE_BYTES {
        return refuse(
            &s,
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!(
                "response of {} bytes for {id} exceeds {MAX_RESPONSE_BYTES}",
                body.len()
            ),
        );
    }
    s.observe(Observed::Response {
        request_id: id,
        at,
        body,
    });
    accepted()
}

async fn error(State(s): State<Shared>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    if !s.finish(&id) {
        return refuse(
            &s,
            StatusCode::BAD_REQUEST,
            "InvalidRequestID",
            format!("POST error for unknown request id {id:?}"),
        );
    }
    s.observe(Observed::Error {
        request_id: id,
        at,
        error_type: error_type(&headers),
        body,
    });
    accepted()
}

async fn init_error(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    s.observe(Observed::InitError {
        at: Instant::now(),
        error_type: error_type(&headers),
        body,
    });
    accepted()
}

async fn unknown_route(State(s): State<Shared>, req: axum::extract::Request) -> Response {
    let what = format!("{} {}: no such route", req.method(), req.uri().path());
    refuse(&s, StatusCode::NOT_FOUND, "UnknownRoute", what)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol round trip a runtime makes, over real HTTP.
    #[tokio::test]
    async fn hands_out_an_invocation_and_records_its_response() {
        let mut api = RuntimeApi::start("arn:aws:lambda:us-east-1:123456789012:function:f")
            .await
            .unwrap();
        let base = format!("http://{}/2018-06-01/runtime", api.address());
        let id = api
            .invoke(Bytes::from_static(b"{\"x\":1}"), Duration::from_secs(30))
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let next = http.get(format!("{base}/invocation/next")).send().await.unwrap();
        assert_eq!(next.status(), 200);
        let h = next.headers().clone();
        assert_eq!(h[REQUEST_ID], id.as_str());
        assert_eq!(
            h[FUNCTION_ARN],
            "arn:aws:lambda:us-east-1:123456789012:function:f"
        );
        assert!(h[TRACE_ID].to_str().unwrap().starts_with("Root=1-"));
        let deadline: u128 = h[DEADLINE_MS].to_str().unwrap().parse().unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert!(
            deadline > now + 25_000 && deadline <= now + 30_000,
            "{deadline} vs {now}"
        );
        assert_eq!(next.bytes().await.unwrap(), "{\"x\":1}");

        // An unknown id is refused; the real one accepted once.
        let bad = http
            .post(format!("{base}/invocation/nope/response"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
        let ok = http
            .post(format!("{base}/invocation/{id}/response"))
            .body("{\"ok\":true}")
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 202);
        let again = http
            .post(format!("{base}/invocation/{id}/response"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 400, "a request id is answered once");

        assert!(matches!(api.observe().await, Some(Observed::NextRequested(_))));
        assert!(
            matches!(api.observe().await, Some(Observed::Delivered { request_id, .. }) if request_id == id)
        );
        assert!(matches!(api.observe().await, Some(Observed::Refused { .. })));
        match api.observe().await {
            Some(Observed::Response { request_id, body, .. }) => {
                assert_eq!(request_id, id);
                assert_eq!(body, "{\"ok\":true}");
            }
            other => panic!("expected the response, got {other:?}"),
        }
        assert!(matches!(api.observe().await, Some(Observed::Refused { .. })));
    }

    #[tokio::test]
    async fn records_invocation_and_init_errors_with_their_type() {
        let mut api = RuntimeApi::start("arn:aws:lambda:us-east-1:123456789012:function:f")
            .await
            .unwrap();
        let base = format!("http://{}/2018-06-01/runtime", api.address());
        let http = reqwest::Client::new();
        let init = http
            .post(format!("{base}/init/error"))
            .header(ERROR_TYPE, "Runtime.InitError")
            .body("{\"errorType\":\"Config\",\"errorMessage\":\"RELAY_BUCKET missing\"}")
            .send()
            .await
            .unwrap();
        assert_eq!(init.status(), 202);
        match api.observe().await {
            Some(Observed::InitError { error_type, body, .. }) => {
                assert_eq!(error_type.as_deref(), Some("Runtime.InitError"));
                assert!(String::from_utf8_lossy(&body).contains("RELAY_BUCKET"));
            }
            other => panic!("expected the init error, got {other:?}"),
        }

        let id = api
            .invoke(Bytes::from_static(b"{}"), Duration::from_secs(5))
            .await
            .unwrap();
        http.get(format!("{base}/invocation/next")).send().await.unwrap();
        let err = http
            .post(format!("{base}/invocation/{id}/error"))
            .header(ERROR_TYPE, "unhandled")
            .body("{\"errorType\":\"Boom\",\"errorMessage\":\"bad\"}")
            .send()
            .await
            .unwrap();
        assert_eq!(err.status(), 202);
        assert!(matches!(api.observe().await, Some(Observed::NextRequested(_))));
        assert!(matches!(api.observe().await, Some(Observed::Delivered { .. })));
        match api.observe().await {
            Some(Observed::Error {
                request_id,
                error_type,
                ..
            }) => {
                assert_eq!(request_id, id);
                assert_eq!(error_type.as_deref(), Some("unhandled"));
            }
            other => panic!("expected the invocation error, got {other:?}"),
        }
    }
}

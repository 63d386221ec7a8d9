//! The simulator object, its TCP accept loop and the request edge (fault injection + request log).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http_body::Frame;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::auth::presented_token;
use crate::clock::Clock;
use crate::config::SimConfig;
use crate::faults::{FaultAction, Phase, RequestInfo};
use crate::reply;
use crate::state::{RequestLogEntry, State as World};
use crate::storage::{StorageError, Store};

/// Errors starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Shared simulator state: the clock, the world behind one lock, and the upload store.
#[derive(Debug)]
pub struct Sim {
    pub clock: Clock,
    pub store: Store,
    pub seed: u64,
    base_url: String,
    world: Mutex<World>,
}

impl Sim {
    /// Attach route-specific details to a request's log entry (see [`LogSeq`]).
    pub fn log_detail(&self, seq: Option<LogSeq>, detail: serde_json::Value) {
        let Some(LogSeq(seq)) = seq else { return };
        let mut w = self.world_raw();
        if let Some(e) = w.request_log.iter_mut().rev().find(|e| e.seq == seq) {
            e.detail = Some(detail);
        }
    }

    fn new(config: SimConfig, base_url: String) -> Result<Self, SimError> {
        let clock = Clock::new(config.clock);
        let mut world = World::new(config.seed, config.settings);
        if config.seed_defaults {
            world.seed_defaults(clock.now_ms());
        }
        Ok(Self {
            clock,
            store: Store::new(config.storage)?,
            seed: config.seed,
            base_url,
            world: Mutex::new(world),
        })
    }

    /// Current simulator time, ms.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Lock the world without advancing processing.
    pub fn world_raw(&self) -> MutexGuard<'_, World> {
        // Handlers never leave the world half-updated across a panic point, so recover from poisoning.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lock the world after materializing every cluster whose stage 2 finished by now.
    pub fn world(&self) -> MutexGuard<'_, World> {
        let now = self.now_ms();
        let mut w = self.world_raw();
        w.refresh(now);
        w
    }
}

/// Entry point of the library.
pub struct Simulator;

impl Simulator {
    /// Bind `addr` (use `127.0.0.1:0` for an ephemeral port) and serve in the background.
    pub async fn start(config: SimConfig, addr: &str) -> Result<SimHandle, SimError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| SimError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let local = listener.local_addr().map_err(|source| SimError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let base = format!("http://{local}");
        let sim = Arc::new(Sim::new(config, base.clone())?);
        let router = crate::routes::router(sim.clone());
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, router, rx));
        info!(%base, "mapillary-sim listening");
        Ok(SimHandle {
            sim,
            addr: local,
            base,
            shutdown: tx,
            task: Some(task),
        })
    }
}

/// A running simulator; shuts down when dropped (or explicitly with [`SimHandle::shutdown`]).
pub struct SimHandle {
    sim: Arc<Sim>,
    addr: SocketAddr,
    base: String,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> &str {
        &self.base
    }
    /// Graph API base (`MAPILLARY_GRAPH_API_ENDPOINT`).
    pub fn graph_url(&self) -> String {
        format!("{}/graph", self.base)
    }
    /// rupload base (`MAPILLARY_UPLOAD_ENDPOINT`).
    pub fn upload_url(&self) -> String {
        format!("{}/rupload", self.base)
    }
    /// Base of the `/connect` page.
    pub fn www_url(&self) -> String {
        format!("{}/www", self.base)
    }
    /// Coverage tiles base (`{tiles}`: serves `/maps/vtp/…`).
    pub fn tiles_url(&self) -> String {
        format!("{}/tiles", self.base)
    }
    /// Admin API base.
    pub fn admin_url(&self) -> String {
        format!("{}/_sim", self.base)
    }
    /// Bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The shared simulator state (for in-process inspection).
    pub fn sim(&self) -> &Arc<Sim> {
        &self.sim
    }
    /// Move the simulator clock forward.
    pub fn advance_clock(&self, seconds: i64) {
        self.sim.clock.advance_ms(seconds.saturating_mul(1000));
    }
    /// Stop accepting, let open connections finish (up to 2 s), then close them.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Per-connection kill switch, handed to handlers as a request extension.
#[derive(Clone, Debug)]
pub struct ConnKill(pub Arc<Notify>);

impl ConnKill {
    /// Close the TCP connection without replying; never returns.
    pub async fn fire(&self) -> Response {
        self.0.notify_one();
        std::future::pending::<Response>().await
    }
}

async fn accept_loop(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_connection(stream, peer, router.clone(), shutdown.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
        while conns.try_join_next().is_some() {}
    }
    let drained = tokio::time::timeout(Duration::from_secs(2), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
    }
    debug!("accept loop stopped");
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let kill = Arc::new(Notify::new());
    let ext = ConnKill(kill.clone());
    let svc = router.map_request(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ext.clone());
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let mut shutting = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "connection ended with error");
                }
                break;
            }
            _ = kill.notified() => {
                info!(%peer, "connection dropped on purpose (fault)");
                break;
            }
            _ = shutdown.changed(), if !shutting => {
                shutting = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A request body that fails after `remaining` bytes (the "connection dropped mid-body" fault).
struct Cutoff {
    inner: Body,
    remaining: u64,
}

impl http_body::Body for Cutoff {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(Some(Err(axum::Error::new("connection dropped by fault"))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let Some(data) = frame.data_ref() else {
                    return Poll::Ready(Some(Ok(frame)));
                };
                let len = data.len() as u64;
                if len > self.remaining {
                    let keep = usize::try_from(self.remaining).unwrap_or(usize::MAX);
                    let part = data.slice(..keep);
                    self.remaining = 0;
                    return Poll::Ready(Some(Ok(Frame::data(part))));
                }
                self.remaining -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }
}

fn http_date_in(seconds: u64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(i64::try_from(seconds).unwrap_or(0));
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&fmt).unwrap_or_default()
}

fn fault_response(action: &FaultAction, path: &str) -> Option<Response> {
    let r = match action {
        FaultAction::RateLimited { status, backoff } => reply::json_reply(
            StatusCode::from_u16(*status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            serde_json::json!({"backoff": backoff, "debug_info": {"retriable": false,
                "type": "RequestRateLimitedError", "message": "Request rate limit has been exceeded"}}),
        ),
        FaultAction::Bare429 { retry_after } => {
            let mut r = StatusCode::TOO_MANY_REQUESTS.into_response();
            if let Some(v) = retry_after.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
            r
        }
        FaultAction::ServerError {
            status,
            retry_after,
            retry_after_date_in,
        } => {
            let mut r = reply::json_reply(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                serde_json::json!({"error": {"message": "Service temporarily unavailable (sim fault)",
                    "type": "MLYApiException", "is_transient": true, "code": 2}}),
            );
            let value = retry_after
                .clone()
                .or_else(|| retry_after_date_in.map(http_date_in));
            if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
            r
        }
        FaultAction::OffsetInvalid => reply::offset_invalid(),
        FaultAction::Unauthorized => {
            if path.starts_with("/rupload") {
                reply::rupload_unauthorized("Invalid or expired token (sim fault)")
            } else {
                reply::graph_unauthorized("Error validating access token: Session has expired (sim fault)")
            }
        }
        FaultAction::GraphRateLimit => reply::graph_rate_limited(),
        FaultAction::Status {
            status,
            body,
            headers,
        } => {
            let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = match body {
                Some(b) => reply::json_reply(code, b.clone()),
                None => code.into_response(),
            };
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                    r.headers_mut().insert(k, v);
                }
            }
            r
        }
        FaultAction::GraphqlError { message } => reply::graphql_error(
            StatusCode::BAD_REQUEST,
            100,
            message
                .as_deref()
                .unwrap_or("GraphQL execution failed (sim fault)"),
        ),
        FaultAction::ReduceData => reply::reduce_data(),
        _ => return None,
    };
    Some(r)
}

/// Apply a node-level feed drift to a GraphQL reply body.
fn drift_nodes(v: &mut Value, action: &FaultAction) {
    match v {
        Value::Object(map) => {
            if map.get("__typename").and_then(Value::as_str) == Some("ClusterLatestActivityItem") {
                match action {
                    FaultAction::SetNodeField { field, value } => {
                        map.insert(field.clone(), value.clone());
                    }
                    FaultAction::RemoveNodeField { field } => {
                        map.remove(field);
                    }
                    FaultAction::RenameNodeField { from, to } => {
                        if let Some(x) = map.remove(from) {
                            map.insert(to.clone(), x);
                        }
                    }
                    _ => {}
                }
                return;
            }
            for x in map.values_mut() {
                drift_nodes(x, action);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|x| drift_nodes(x, action)),
        _ => {}
    }
}

async fn transform_json(resp: Response, action: &FaultAction) -> Response {
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    drift_nodes(&mut v, action);
    let mut parts = parts;
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(v.to_string()))
}

/// The request-log sequence number of the request being handled (a request extension), so routes
/// can add details to their log entry with [`Sim::log_detail`].
#[derive(Debug, Clone, Copy)]
pub struct LogSeq(pub u64);

/// Middleware on every non-admin request: match fault rules, log, and act.
pub async fn edge(State(sim): State<Arc<Sim>>, req: Request, next: Next) -> Result<Response, Infallible> {
    let path = req.uri().path().to_string();
    if path.starts_with("/_sim") {
        return Ok(next.run(req).await);
    }
    let method = req.method().as_str().to_string();
    let token = presented_token(req.headers(), req.uri().query());
    let now = sim.now_ms();
    let (seq, chosen, latency_ms, class) = {
        let mut w = sim.world_raw();
        let class = w.classify(token.as_deref(), now);
        let user_id = class.user_id().map(str::to_string);
        let username = user_id
            .as_deref()
            .and_then(|u| w.users.get(u))
            .map(|u| u.username.clone());
        let info = RequestInfo {
            method: &method,
            path: &path,
            token: token.as_deref(),
            user_id: user_id.as_deref(),
            username: username.as_deref(),
        };
        let mut chosen = None;
        let mut latency_ms = 0;
        for rule in w.faults.iter_mut() {
            let is_latency = matches!(rule.spec.action, FaultAction::Latency { .. });
            if chosen.is_some() && !is_latency {
                continue;
            }
            if rule.consider(&info) {
                match &rule.spec.action {
                    FaultAction::Latency { ms } => latency_ms += ms,
                    a => chosen = Some((rule.id, a.clone(), rule.spec.phase)),
                }
            }
        }
        let seq = w.request_log.len() as u64 + 1;
        w.request_log.push(RequestLogEntry {
            seq,
            at_ms: now,
            method: method.clone(),
            path: path.clone(),
            status: None,
            token_kind: class.label().to_string(),
            user_id,
            client_app_id: match &class {
                crate::state::TokenClass::Client { app_id } => Some(app_id.clone()),
                _ => None,
            },
            fault_rule: chosen.as_ref().map(|c| c.0),
            offset_header: req
                .headers()
                .get("offset")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            detail: None,
        });
        (seq, chosen, latency_ms, class)
    };
    debug!(%method, %path, token = class.label(), "request");
    if latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }
    let mut req = req;
    req.extensions_mut().insert(LogSeq(seq));
    let kill = req.extensions().get::<ConnKill>().cloned();
    let set_status = |status: Option<u16>| {
        let mut w = sim.world_raw();
        if let Some(e) = w.request_log.iter_mut().rev().find(|e| e.seq == seq) {
            e.status = status;
        }
    };
    let resp = match chosen {
        None => next.run(req).await,
        Some((id, action, phase)) => {
            info!(rule = id, %method, %path, ?phase, kind = ?std::mem::discriminant(&action), "fault fires");
            match (&action, phase) {
                (FaultAction::DropAfterBytes { bytes }, _) => {
                    let (parts, body) = req.into_parts();
                    let req = Request::from_parts(
                        parts,
                        Body::new(Cutoff {
                            inner: body,
                            remaining: *bytes,
                        }),
                    );
                    let _ = next.run(req).await;
                    return Ok(drop_now(kill, &set_status).await);
                }
                (FaultAction::LostReply, _) | (FaultAction::DropConnection, Phase::After) => {
                    let _ = next.run(req).await;
                    return Ok(drop_now(kill, &set_status).await);
                }
                (FaultAction::DropConnection, Phase::Before) => {
                    return Ok(drop_now(kill, &set_status).await);
                }
                (
                    FaultAction::SetNodeField { .. }
                    | FaultAction::RemoveNodeField { .. }
                    | FaultAction::RenameNodeField { .. },
                    _,
                ) => {
                    let r = next.run(req).await;
                    transform_json(r, &action).await
                }
                (a, Phase::After) => {
                    let _ = next.run(req).await;
                    fault_response(a, &path)
                        .unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response())
                }
                (a, Phase::Before) => fault_response(a, &path)
                    .unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
            }
        }
    };
    set_status(Some(resp.status().as_u16()));
    Ok(resp)
}

async fn drop_now(kill: Option<ConnKill>, set_status: &impl Fn(Option<u16>)) -> Response {
    set_status(None);
    match kill {
        Some(k) => k.fire().await,
        // Not served through our accept loop (e.g. a direct tower call): nothing to close.
        None => StatusCode::BAD_GATEWAY.into_response(),
    }
}

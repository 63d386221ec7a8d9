//! Every failure of a Mapillary call, and what it means for the caller: retry later, refresh the
//! token, or "the request may have taken effect" (`finish_upload` is not idempotent). Messages carry
//! Mapillary's own message, never a token or a URL with a query string.

use std::time::Duration;

use super::feed::FeedError;
use super::replies::BadReply;

/// How a transport failure happened (matters for `finish_upload`, which is not idempotent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// The connection could not be opened: the request was definitely not sent.
    Connect,
    /// The request or the reply timed out.
    Timeout,
    /// The connection broke while sending the request or reading the reply.
    Other,
}

/// Every failure of a Mapillary call.
#[derive(Debug, thiserror::Error)]
pub enum MapillaryError {
    /// The token is missing, expired, revoked or not allowed here (401/403, rupload
    /// `NotAuthorizedError`, graph code 190). Refresh the token once and retry.
    #[error("Mapillary rejected the token: {message}")]
    Unauthorized { message: String },
    /// Rate limited (429, rupload `RequestRateLimitedError`, graph code 4). `retry_after` is what
    /// the server asked for (`backoff` ms or `Retry-After`), `None` when it did not say.
    #[error("Mapillary rate limit: {message} (retry after {retry_after:?})")]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// rupload 412 `OffsetInvalidError`: fetch the offset again and continue from there.
    #[error("rupload refused the offset: {message}")]
    OffsetInvalid { message: String },
    /// A 5xx reply.
    #[error("Mapillary server error {status}: {message}")]
    Server {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The connection failed or timed out.
    #[error("connection to Mapillary failed ({kind:?}): {message}")]
    Transport { kind: TransportKind, message: String },
    /// A 2xx reply without the expected content (e.g. no `offset`, no `h`, no `cluster_id`).
    #[error("unexpected reply from Mapillary (HTTP {status}): {message}")]
    BadReply { status: u16, message: String },
    /// Any other error reply. `code`/`subcode` are the graph API's, `kind` the graph `error.type` or
    /// rupload `debug_info.type`; `retriable` is rupload's `debug_info.retriable` or graph `is_transient`.
    #[error("Mapillary error {status}{}: {message}", kind.as_deref().map(|k| format!(" {k}")).unwrap_or_default())]
    Api {
        status: u16,
        code: Option<i64>,
        subcode: Option<i64>,
        kind: Option<String>,
        message: String,
        retriable: bool,
    },
    /// The activity feed answered 200 but not with a usable page (drift, GraphQL error).
    #[error(transparent)]
    Feed(#[from] FeedError),
    /// The upload body stream failed or yielded a different number of bytes than announced.
    #[error("upload body failed: {0}")]
    BodySource(String),
    /// A caller-supplied value cannot be sent (e.g. a token with characters not allowed in a header).
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// The retry budget ran out; `last` is the final failure.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted {
        attempts: u32,
        last: Box<MapillaryError>,
    },
}

impl MapillaryError {
    /// Whether trying the same call again later may succeed (without changing the token).
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::RateLimited { .. }
            | Self::OffsetInvalid { .. }
            | Self::Server { .. }
            | Self::Transport { .. } => true,
            Self::Api { retriable, .. } => *retriable,
            Self::Exhausted { last, .. } => last.is_retriable(),
            Self::Unauthorized { .. }
            | Self::BadReply { .. }
            | Self::Feed(_)
            | Self::BodySource(_)
            | Self::InvalidInput(_) => false,
        }
    }

    /// The request may have taken effect although it failed (a 5xx, a connection that broke after
    /// the request was sent, an unreadable 2xx). For `finish_upload` this means "a cluster may
    /// exist"; `false` means the call definitely did nothing.
    pub fn is_ambiguous(&self) -> bool {
        match self {
            Self::Server { .. } | Self::BadReply { .. } => true,
            Self::Transport { kind, .. } => *kind != TransportKind::Connect,
            Self::Exhausted { last, .. } => last.is_ambiguous(),
            _ => false,
        }
    }

    /// The token must be refreshed before retrying.
    pub fn is_unauthorized(&self) -> bool {
        match self {
            Self::Unauthorized { .. } => true,
            Self::Exhausted { last, .. } => last.is_unauthorized(),
            _ => false,
        }
    }

    /// From a `reqwest` failure; the URL (which may hold an `access_token`) is dropped.
    pub fn from_transport(e: reqwest::Error) -> Self {
        let kind = if e.is_connect() {
            TransportKind::Connect
        } else if e.is_timeout() {
            TransportKind::Timeout
        } else {
            TransportKind::Other
        };
        Self::Transport {
            kind,
            message: error_chain(&e.without_url()),
        }
    }
}

impl From<BadReply> for MapillaryError {
    fn from(e: BadReply) -> Self {
        Self::BadReply {
            status: e.status,
            message: e.message,
        }
    }
}

/// An error and its sources, joined (reqwest's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

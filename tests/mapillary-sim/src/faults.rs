//! Fault rules: which requests they match, when they fire and what they do.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A rule as posted to `POST /_sim/faults`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultSpec {
    /// HTTP method to match (any when absent).
    #[serde(default)]
    pub method: Option<String>,
    /// Path pattern; `*` matches any run of characters (e.g. `/rupload/*`).
    pub path: String,
    /// Only requests whose token belongs to this user (id or username).
    #[serde(default)]
    pub user: Option<String>,
    /// Only requests presenting exactly this token.
    #[serde(default)]
    pub token: Option<String>,
    /// Fire on the next `times` matches (combined with `every` / `probability` when given).
    #[serde(default)]
    pub times: Option<u64>,
    /// Fire on every k-th match (k, 2k, …).
    #[serde(default)]
    pub every: Option<u64>,
    /// Fire with this probability per match, from a generator seeded with `seed`.
    #[serde(default)]
    pub probability: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// `before` the handler runs (default) or `after` it (the handler's effects happen, then the fault).
    #[serde(default)]
    pub phase: Phase,
    pub action: FaultAction,
}

/// When a fault acts relative to the handler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Before,
    After,
}

/// What a firing rule does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultAction {
    /// `RequestRateLimitedError` body with `backoff` (any JSON value: ms number or a non-number) and
    /// the given status (429 default, 400 variant).
    RateLimited {
        #[serde(default = "default_429")]
        status: u16,
        #[serde(default = "default_backoff")]
        backoff: Value,
    },
    /// A bare 429 without a JSON body, with an optional `Retry-After` header value.
    Bare429 {
        #[serde(default)]
        retry_after: Option<String>,
    },
    /// 5xx with an optional `Retry-After`: `retry_after` verbatim, or `retry_after_date_in` seconds
    /// from now rendered as an HTTP-date.
    ServerError {
        #[serde(default = "default_503")]
        status: u16,
        #[serde(default)]
        retry_after: Option<String>,
        #[serde(default)]
        retry_after_date_in: Option<u64>,
    },
    /// 412 `OffsetInvalidError` even when the offset matches.
    OffsetInvalid,
    /// 401: graph code 190 under `/graph`, rupload `NotAuthorizedError` elsewhere.
    Unauthorized,
    /// 403 code 4 "Application request limit reached".
    GraphRateLimit,
    /// Any status, JSON body and headers.
    Status {
        status: u16,
        #[serde(default)]
        body: Option<Value>,
        #[serde(default)]
        headers: Vec<(String, String)>,
    },
    /// Close the connection after `bytes` bytes of the request body (the handler sees a broken body).
    DropAfterBytes { bytes: u64 },
    /// Let the handler finish (body stored, cluster created…), then close without replying.
    LostReply,
    /// Close the connection without reading the body or replying (with phase `after`: after the handler).
    DropConnection,
    /// Sleep before handling (does not stop other rules from firing).
    Latency { ms: u64 },
    /// GraphQL error reply.
    GraphqlError {
        #[serde(default)]
        message: Option<String>,
    },
    /// The "reduce the amount of data" error.
    ReduceData,
    /// Replace a field of every activity node with a value (e.g. an unknown enum in `status`).
    SetNodeField { field: String, value: Value },
    /// Remove a field from every activity node.
    RemoveNodeField { field: String },
    /// Rename a field of every activity node.
    RenameNodeField { from: String, to: String },
}

fn default_429() -> u16 {
    429
}
fn default_503() -> u16 {
    503
}
fn default_backoff() -> Value {
    Value::from(13000)
}

/// A stored rule and its counters.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRule {
    pub id: u64,
    #[serde(flatten)]
    pub spec: FaultSpec,
    /// Requests that matched method, path, user and token.
    pub matches: u64,
    /// Times the rule fired.
    pub hits: u64,
    #[serde(skip)]
    rng: u64,
}

/// What is known about a request when rules are matched.
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub token: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub username: Option<&'a str>,
}

impl FaultRule {
    pub fn new(id: u64, spec: FaultSpec, default_seed: u64) -> Self {
        let rng = spec
            .seed
            .unwrap_or(default_seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            | 1;
        Self {
            id,
            spec,
            matches: 0,
            hits: 0,
            rng,
        }
    }

    fn matches(&self, req: &RequestInfo<'_>) -> bool {
        if let Some(m) = &self.spec.method {
            if !m.eq_ignore_ascii_case(req.method) {
                return false;
            }
        }
        if !glob(&self.spec.path, req.path) {
            return false;
        }
        if let Some(u) = &self.spec.user {
            if req.user_id != Some(u.as_str()) && req.username != Some(u.as_str()) {
                return false;
            }
        }
        if let Some(t) = &self.spec.token {
            if req.token != Some(t.as_str()) {
                return false;
            }
        }
        true
    }

    /// xorshift64*: tiny, seeded, good enough for "a fraction of matches".
    fn next_fraction(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Count a request and decide whether the rule fires for it.
    pub fn consider(&mut self, req: &RequestInfo<'_>) -> bool {
        if !self.matches(req) {
            return false;
        }
        if self.spec.times.is_some_and(|t| self.hits >= t) {
            return false;
        }
        self.matches += 1;
        if let Some(k) = self.spec.every {
            if k == 0 || self.matches % k != 0 {
                return false;
            }
        }
        if let Some(p) = self.spec.probability {
            if self.next_fraction() >= p {
                return false;
            }
        }
        self.hits += 1;
        true
    }
}

/// `*`-glob match over the whole string.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_prefixes_and_middles() {
        assert!(glob("/rupload/*", "/rupload/abc.zip"));
        assert!(!glob("/rupload/*", "/graph/x"));
        assert!(glob("/graph/finish_upload", "/graph/finish_upload"));
        assert!(glob("*", "/anything"));
        assert!(glob("/a/*/c*", "/a/b/cd"));
        assert!(!glob("/a/*/c", "/a/c"));
    }

    fn req() -> RequestInfo<'static> {
        RequestInfo {
            method: "POST",
            path: "/rupload/k",
            token: None,
            user_id: None,
            username: None,
        }
    }

    #[test]
    fn times_every_and_probability_limit_firing() {
        let spec: FaultSpec = serde_json::from_value(
            serde_json::json!({"path":"/rupload/*","times":2,"action":{"kind":"offset_invalid"}}),
        )
        .unwrap();
        let mut r = FaultRule::new(1, spec.clone(), 1);
        assert!(r.consider(&req()));
        assert!(r.consider(&req()));
        assert!(!r.consider(&req()));
        assert_eq!(r.hits, 2);

        let mut every = FaultRule::new(
            2,
            FaultSpec {
                times: None,
                every: Some(3),
                ..spec.clone()
            },
            1,
        );
        let fired: Vec<bool> = (0..6).map(|_| every.consider(&req())).collect();
        assert_eq!(fired, [false, false, true, false, false, true]);

        let mut p = FaultRule::new(
            3,
            FaultSpec {
                times: None,
                probability: Some(0.5),
                seed: Some(9),
                ..spec
            },
            1,
        );
        let n = (0..1000).filter(|_| p.consider(&req())).count();
        assert!((350..650).contains(&n), "{n}");
    }
}

//! Token extraction and the per-endpoint token rules of protocol §14.1.

use axum::http::HeaderMap;
use axum::response::Response;

use crate::config::GraphqlPolicy;
use crate::reply;
use crate::state::{State, TokenClass};

/// The token from `Authorization: OAuth <t>` (or `Bearer <t>`), else from `access_token=` in the query.
pub fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some((scheme, rest)) = v.split_once(' ') {
            if scheme.eq_ignore_ascii_case("oauth") || scheme.eq_ignore_ascii_case("bearer") {
                let t = rest.trim();
                if !t.is_empty() {
                    return Some(t.to_string());
                }
            }
        }
    }
    let q = query?;
    form_pairs(q.as_bytes())
        .into_iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
}

/// The token from `Authorization: OAuth <t>` only: what rupload takes when
/// [`crate::Settings::rupload_oauth_header_only`] is on (mapillary_tools always sends this form, §1.1).
pub fn oauth_header_token(headers: &HeaderMap) -> Option<String> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, rest) = v.split_once(' ')?;
    let t = rest.trim();
    (scheme.eq_ignore_ascii_case("oauth") && !t.is_empty()).then(|| t.to_string())
}

/// Decode `application/x-www-form-urlencoded` pairs.
pub fn form_pairs(raw: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(raw).unwrap_or_default()
}

/// What a graph endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A valid user token (`/me`, `finish_upload`, …).
    User,
    /// A user token, or a client token when entity reads accept them.
    Entity,
    /// A client (app) token (`/login`, `/logging`).
    Client,
    /// GraphQL policy.
    Graphql,
    /// A user token allowed to upload (rupload and `finish_upload`).
    Upload,
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub class: TokenClass,
}

impl Caller {
    /// User id (for user tokens).
    pub fn user_id(&self) -> Option<&str> {
        self.class.user_id()
    }
}

fn denial(class: &TokenClass, need: Need, w: &State) -> Option<&'static str> {
    match class {
        TokenClass::None => return Some("An active access token must be used to query information"),
        TokenClass::Unknown => return Some("Invalid OAuth 2.0 Access Token"),
        TokenClass::Expired { .. } => return Some("Error validating access token: Session has expired"),
        TokenClass::Revoked => {
            return Some("Error validating access token: The session has been invalidated")
        }
        _ => {}
    }
    let s = &w.settings;
    match (need, class) {
        (Need::User, TokenClass::User { .. }) => None,
        (Need::Upload, TokenClass::User { oauth, .. }) => {
            if *oauth && !s.oauth_tokens_can_upload {
                Some("This token is not authorized to upload")
            } else {
                None
            }
        }
        (Need::Entity, TokenClass::User { .. }) => None,
        (Need::Entity, TokenClass::Client { .. }) if s.entities_accept_client_token => None,
        (Need::Client, TokenClass::Client { .. }) => None,
        (Need::Graphql, TokenClass::User { .. }) if s.graphql_policy == GraphqlPolicy::AnyToken => None,
        (Need::Graphql, TokenClass::Client { app_id }) => match s.graphql_policy {
            GraphqlPolicy::AnyToken => None,
            GraphqlPolicy::WebAppOnly if app_id == crate::defaults::WEB_APP_ID => None,
            GraphqlPolicy::WebAppOnly => Some("This application is not allowed to use this endpoint"),
        },
        (Need::Graphql, _) => Some("This application is not allowed to use this endpoint"),
        (Need::Client, _) => Some("This endpoint requires an application (client) access token"),
        _ => Some("This endpoint requires a user access token"),
    }
}

/// Check the caller of a graph endpoint; the error is the 401 code-190 reply.
pub fn check_graph(w: &State, token: Option<&str>, now_ms: i64, need: Need) -> Result<Caller, Response> {
    let class = w.classify(token, now_ms);
    match denial(&class, need, w) {
        None => Ok(Caller { class }),
        Some(msg) => Err(reply::graph_unauthorized(msg)),
    }
}

/// Check the caller of rupload; the error is the 401 `NotAuthorizedError` reply.
///
/// With [`crate::Settings::rupload_oauth_header_only`], a token sent as `Bearer` or as `access_token=` is
/// refused like a missing one (the real reply to either is unknown; a server that reads only the `OAuth`
/// scheme sees no token at all, so the simulator answers what it answers to no token, with a message
/// naming the accepted form).
pub fn check_rupload(
    w: &State,
    headers: &HeaderMap,
    query: Option<&str>,
    now_ms: i64,
) -> Result<Caller, Response> {
    let token = if w.settings.rupload_oauth_header_only {
        let strict = oauth_header_token(headers);
        if strict.is_none() && presented_token(headers, query).is_some() {
            return Err(reply::rupload_unauthorized(
                "rupload takes the access token only as `Authorization: OAuth <token>` \
                 (not Bearer, not access_token=)",
            ));
        }
        strict
    } else {
        presented_token(headers, query)
    };
    let class = w.classify(token.as_deref(), now_ms);
    match denial(&class, Need::Upload, w) {
        None => Ok(Caller { class }),
        Some(msg) => Err(reply::rupload_unauthorized(msg)),
    }
}

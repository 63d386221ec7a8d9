//! OAuth (`/www/connect`, `/graph/token`), `/graph/login` and `/graph/logging`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tracing::info;

use super::Params;
use crate::auth::{check_graph, form_pairs, presented_token, Need};
use crate::reply::{self, graph_error, ok};
use crate::server::Sim;
use crate::state::AuthCode;

fn oauth_error(message: &str, code: i64) -> Response {
    graph_error(StatusCode::BAD_REQUEST, code, None, "OAuthException", message)
}

/// Form or JSON body (plus query string) as string pairs.
fn body_params(headers: &HeaderMap, query: Option<&str>, body: &[u8]) -> Params {
    let mut out: Params = query
        .map(|q| form_pairs(q.as_bytes()).into_iter().collect())
        .unwrap_or_default();
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"))
        || body.first() == Some(&b'{');
    if is_json {
        if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
            for (k, v) in map {
                if let Some(s) = super::id_string(&v) {
                    out.insert(k, s);
                }
            }
        }
    } else {
        out.extend(form_pairs(body));
    }
    out
}

fn redirect(location: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, location.to_string())]).into_response()
}

fn with_params(base: &url::Url, pairs: &[(&str, &str)]) -> String {
    let mut u = base.clone();
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    u.to_string()
}

fn is_loopback_http(u: &url::Url) -> bool {
    u.scheme() == "http"
        && matches!(
            u.host_str(),
            Some("127.0.0.1") | Some("localhost") | Some("[::1]")
        )
}

/// `GET /www/connect`: consent automatically and redirect with `code` and `state`.
pub async fn connect(State(sim): State<Arc<Sim>>, Query(p): Query<Params>) -> Response {
    let now = sim.now_ms();
    let mut w = sim.world();
    let state = p.get("state").cloned().unwrap_or_default();
    let app = p.get("client_id").and_then(|id| w.apps.get(id)).cloned();
    let redirect_uri = match (p.get("redirect_uri"), &app) {
        (Some(r), _) => r.clone(),
        (None, Some(a)) if a.redirect_uris.len() == 1 => a.redirect_uris[0].clone(),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "redirect_uri is required (mapillary-sim)",
            )
                .into_response();
        }
    };
    let Ok(target) = url::Url::parse(&redirect_uri) else {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri is not a URL (mapillary-sim)",
        )
            .into_response();
    };
    let fail = |error: &str, desc: &str| {
        redirect(&with_params(
            &target,
            &[("error", error), ("error_description", desc), ("state", &state)],
        ))
    };
    let Some(app) = app else {
        return fail("unauthorized_client", "Unknown client_id");
    };
    let registered = app.redirect_uris.contains(&redirect_uri)
        || (w.settings.allow_loopback_redirects && is_loopback_http(&target));
    if !registered {
        return fail(
            "invalid_request",
            "redirect_uri does not match the registered callback",
        );
    }
    if p.get("response_type").is_some_and(|r| r != "code") {
        return fail(
            "unsupported_response_type",
            "Only response_type=code is supported",
        );
    }
    let who = p
        .get("sim_user")
        .cloned()
        .unwrap_or_else(|| w.settings.connect_user_id.clone());
    let Some(user_id) = w.find_user(&who).map(|u| u.id.clone()) else {
        return fail("access_denied", "The consenting user does not exist");
    };
    let code = w.ids.token("AQ", 64);
    let expires_at_ms = now + w.settings.code_lifetime_seconds * 1000;
    w.codes.insert(
        code.clone(),
        AuthCode {
            app_id: app.id.clone(),
            user_id,
            expires_at_ms,
            used: false,
        },
    );
    info!(app = %app.id, "authorization code issued");
    redirect(&with_params(&target, &[("code", &code), ("state", &state)]))
}

/// `POST /graph/token`: authorization_code and refresh_token grants.
pub async fn token(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let now = sim.now_ms();
    let p = body_params(&headers, query.as_deref(), &body);
    let secret = presented_token(&headers, None);
    let mut w = sim.world();
    let Some(app) = secret
        .as_deref()
        .and_then(|s| w.apps.values().find(|a| a.secret == s))
        .cloned()
    else {
        return oauth_error("Error validating client secret.", 101);
    };
    if p.get("client_id").is_some_and(|c| c != &app.id) {
        return oauth_error("client_id does not match the client secret.", 101);
    }
    let lifetime = w.settings.token_lifetime_seconds;
    let (user_id, old) = match p.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let Some(code) = p.get("code") else {
                return oauth_error("Missing authorization code.", 100);
            };
            let Some(rec) = w.codes.get_mut(code) else {
                return oauth_error("Invalid verification code format.", 100);
            };
            if rec.used {
                return oauth_error("This authorization code has been used.", 100);
            }
            if now >= rec.expires_at_ms {
                return oauth_error("This authorization code has expired.", 100);
            }
            if rec.app_id != app.id {
                return oauth_error("The authorization code was issued to another application.", 100);
            }
            rec.used = true;
            (rec.user_id.clone(), None)
        }
        Some("refresh_token") => {
            let Some(given) = p.get("refresh_token") else {
                return oauth_error("Missing refresh_token.", 100);
            };
            let access = w
                .refresh_tokens
                .get(given)
                .cloned()
                .unwrap_or_else(|| given.clone());
            let Some(rec) = w.tokens.get(&access) else {
                return oauth_error("Invalid refresh token.", 190);
            };
            if rec.revoked {
                return oauth_error("The session has been invalidated.", 190);
            }
            if rec.oauth_app.as_deref() != Some(app.id.as_str()) {
                return oauth_error("This token was not issued to this application.", 190);
            }
            // Expired tokens may be refreshed (sim choice; lets a client recover after a 401).
            (rec.user_id.clone(), Some(access))
        }
        _ => return oauth_error("Unsupported grant_type.", 100),
    };
    let access = w.issue_token(&user_id, Some(app.id.clone()), lifetime, now);
    if let Some(old) = old {
        if w.settings.refresh_revokes_old {
            if let Some(rec) = w.tokens.get_mut(&old) {
                rec.revoked = true;
            }
        }
    }
    let mut out = json!({"access_token": access, "token_type": "bearer", "expires_in": lifetime});
    if w.settings.refresh_token_field {
        let rt = w.ids.token("MLYRT", 48);
        w.refresh_tokens.insert(rt.clone(), access.clone());
        out["refresh_token"] = json!(rt);
    }
    info!(app = %app.id, user = %user_id, "user token issued");
    ok(out)
}

/// `POST /graph/login` (client token; JSON `{email, password, locale}`).
pub async fn login(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let now = sim.now_ms();
    let token = presented_token(&headers, query.as_deref());
    let mut w = sim.world();
    if let Err(r) = check_graph(&w, token.as_deref(), now, Need::Client) {
        return r;
    }
    let p = body_params(&headers, None, &body);
    let user = w
        .users
        .values()
        .find(|u| {
            u.email.is_some()
                && u.email.as_ref() == p.get("email")
                && u.password.as_ref() == p.get("password")
        })
        .cloned();
    let Some(user) = user else {
        let body = json!({"error": {"message": "Invalid email or password", "type": "OAuthException", "code": 100,
            "error_subcode": 1348028, "error_user_title": "Incorrect login",
            "error_user_msg": "The email or password you entered is incorrect."}});
        return reply::json_reply(StatusCode::UNAUTHORIZED, body);
    };
    let lifetime = w.settings.token_lifetime_seconds;
    let access = w.issue_token(&user.id, None, lifetime, now);
    ok(json!({"access_token": access, "user_id": user.id}))
}

/// `POST /graph/logging`: recorded, never fails.
pub async fn logging(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let now = sim.now_ms();
    let token = presented_token(&headers, query.as_deref());
    let mut w = sim.world();
    let kind = w.classify(token.as_deref(), now).label();
    let payload = serde_json::from_slice::<Value>(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    w.logging_events
        .push(json!({"at_ms": now, "token_kind": kind, "body": payload}));
    ok(json!({"success": true}))
}

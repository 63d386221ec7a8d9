//! The caller's user id.
//!
//! Behind the HTTP API's JWT authorizer, API Gateway puts the verified claims into the request
//! context (`requestContext.authorizer.jwt.claims`); the `sub` claim is the user id. Nothing else
//! is trusted: headers are ignored, except in the explicit dev mode where
//! [`Settings::dev_auth_header`](crate::config::Settings::dev_auth_header) names a header that
//! carries the user id for requests without any authorizer context (`cargo lambda watch`'s function
//! URLs have none). That mode is off unless the variable is set, and the template never sets it.

use axum::http::request::Parts;
use lambda_http::request::RequestContext;

use crate::problem::Problem;
use crate::validate::{is_valid_id, MAX_ID_LEN};

/// The JWT claims API Gateway passed, if the request went through a JWT authorizer.
fn jwt_claims(parts: &Parts) -> Option<&std::collections::HashMap<String, String>> {
    match parts.extensions.get::<RequestContext>()? {
        RequestContext::ApiGatewayV2(ctx) => ctx.authorizer.as_ref()?.jwt.as_ref().map(|j| &j.claims),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Whether the request carries an authorizer context (then the dev header is never looked at).
fn has_authorizer(parts: &Parts) -> bool {
    match parts.extensions.get::<RequestContext>() {
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.authorizer.is_some(),
        _ => false,
    }
}

/// The caller's user id, if the request has one: `Ok(None)` when it has none (the caller decides
/// whether that is a 401), an error when it has one that cannot be a user id.
pub fn caller(parts: &Parts, dev_header: Option<&http::HeaderName>) -> Result<Option<String>, Problem> {
    let sub = match jwt_claims(parts) {
        Some(claims) => claims.get("sub").cloned(),
        None if has_authorizer(parts) => None,
        None => match dev_header {
            Some(name) => match parts.headers.get(name) {
                None => None,
                Some(v) => Some(
                    v.to_str()
                        .map_err(|_| Problem::unauthenticated("the identity header is not visible ASCII"))?
                        .to_string(),
                ),
            },
            None => None,
        },
    };
    match sub {
        None => Ok(None),
        Some(s) if is_valid_id(&s) => Ok(Some(s)),
        Some(_) => Err(Problem::unauthenticated(format!(
            "the token's subject cannot be used as a user id (1-{MAX_ID_LEN} characters of [A-Za-z0-9._-])"
        ))),
    }
}

/// The caller's user id, or 401.
pub fn require(parts: &Parts, dev_header: Option<&http::HeaderName>) -> Result<String, Problem> {
    caller(parts, dev_header)?.ok_or_else(|| {
        Problem::unauthenticated("this route needs a bearer JWT whose `sub` claim identifies the caller")
    })
}

//! Path and query input rules. Every violation is a 400 [`Problem`] that says what is allowed.

use crate::problem::Problem;

/// Longest id (sequence ids and user ids follow the S3 key rules of zip-and-push).
pub const MAX_ID_LEN: usize = 128;
/// `limit` bounds of `GET /v1/sequences`.
pub const LIMIT_RANGE: std::ops::RangeInclusive<u32> = 1..=100;
/// `limit` when none is given.
pub const DEFAULT_LIMIT: u32 = 20;
/// `limit` bounds of a sequence's image pages and `rejected_limit` of its rejected list.
pub const PAGE_LIMIT_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;
/// Page size of images and rejected images when none is given.
pub const DEFAULT_PAGE_LIMIT: u32 = 500;
/// Longest `cursor` accepted.
pub const MAX_CURSOR_LEN: usize = 512;
/// Longest authorization `code` accepted.
pub const MAX_CODE_LEN: usize = 2048;
/// Length of a `state` we issue (32 random bytes, base64url without padding).
pub const STATE_LEN: usize = 43;

/// Longest Mapillary upload token accepted.
pub const MAX_UPLOAD_TOKEN_LEN: usize = 4096;

/// An upload token: 16–4096 visible ASCII characters without spaces (it travels in an HTTP
/// header). The message never quotes it.
pub fn upload_token(raw: &str) -> Result<&str, Problem> {
    let t = raw.trim();
    if (16..=MAX_UPLOAD_TOKEN_LEN).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(t)
    } else {
        Err(Problem::invalid_parameter(format!(
            "upload_token must be 16-{MAX_UPLOAD_TOKEN_LEN} visible ASCII characters without spaces"
        )))
    }
}

/// Whether `id` is 1–128 characters of `[A-Za-z0-9._-]` and not `.` or `..` (the id rule of the
/// S3 key layout).
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A `sequence_id` path parameter.
pub fn sequence_id(raw: &str) -> Result<&str, Problem> {
    if is_valid_id(raw) {
        Ok(raw)
    } else {
        Err(Problem::invalid_parameter(format!(
            "sequence_id must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-] (not \".\" or \"..\")"
        )))
    }
}

/// Parse a query string into pairs, rejecting names outside `allowed` and repeated names.
pub fn query_pairs(raw: Option<&str>, allowed: &[&str]) -> Result<Vec<(String, String)>, Problem> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            let shown: String = k.chars().take(40).collect();
            return Err(Problem::invalid_parameter(format!(
                "unknown query parameter {shown:?}; allowed: {}",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        if out.iter().any(|(n, _)| n == k.as_ref()) {
            return Err(Problem::invalid_parameter(format!(
                "query parameter {k} is repeated"
            )));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

/// The value of `name` among `pairs`.
pub fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The `limit` query parameter: an integer within [`LIMIT_RANGE`], default [`DEFAULT_LIMIT`].
pub fn limit(raw: Option<&str>) -> Result<u32, Problem> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    let bad = || {
        Problem::invalid_parameter(format!(
            "limit must be an integer from {} to {}",
            LIMIT_RANGE.start(),
            LIMIT_RANGE.end()
        ))
    };
    if raw.is_empty() || raw.len() > 3 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    raw.parse::<u32>()
        .ok()
        .filter(|n| LIMIT_RANGE.contains(n))
        .ok_or_else(bad)
}

/// A page-size query parameter `name`: an integer within [`PAGE_LIMIT_RANGE`] written without
/// leading zeros, default [`DEFAULT_PAGE_LIMIT`].
pub fn page_limit(name: &str, raw: Option<&str>) -> Result<u32, Problem> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_PAGE_LIMIT);
    };
    let bad = || {
        Problem::invalid_parameter(format!(
            "{name} must be an integer from {} to {}",
            PAGE_LIMIT_RANGE.start(),
            PAGE_LIMIT_RANGE.end()
        ))
    };
    if raw.is_empty() || raw.len() > 4 || raw.starts_with('0') || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    raw.parse::<u32>()
        .ok()
        .filter(|n| PAGE_LIMIT_RANGE.contains(n))
        .ok_or_else(bad)
}

/// The `state` of the callback: exactly what [`crate::oauth::new_state`] issues.
pub fn state(raw: &str) -> Result<&str, Problem> {
    if raw.len() == STATE_LEN
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        Ok(raw)
    } else {
        Err(Problem::invalid_parameter(format!(
            "state must be the {STATE_LEN}-character value issued by POST /v1/mapillary/connect"
        )))
    }
}

/// The `code` of the callback: 1–2048 visible ASCII characters.
pub fn code(raw: &str) -> Result<&str, Problem> {
    if (1..=MAX_CODE_LEN).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(raw)
    } else {
        Err(Problem::invalid_parameter(format!(
            "code must be 1-{MAX_CODE_LEN} visible ASCII characters"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_key_rules() {
        assert!(is_valid_id("seq-1.a_B"));
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn limit_bounds() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some("1")).unwrap(), 1);
        assert_eq!(limit(Some("100")).unwrap(), 100);
        for bad in ["0", "101", "-1", "", "1.5", "abc", "0001", "+5"] {
            assert_eq!(limit(Some(bad)).unwrap_err().status, 400, "{bad:?}");
        }
    }

    #[test]
    fn page_limit_bounds() {
        assert_eq!(page_limit("limit", None).unwrap(), DEFAULT_PAGE_LIMIT);
        assert_eq!(page_limit("limit", Some("1")).unwrap(), 1);
        assert_eq!(page_limit("limit", Some("1000")).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "", "1.5", "abc", "0001", "+5", "10000"] {
            let e = page_limit("rejected_limit", Some(bad)).unwrap_err();
            assert_eq!(e.status, 400, "{bad:?}");
        }
    }

    #[test]
    fn query_rejects_unknown_and_repeated() {
        assert!(query_pairs(Some("limit=2&cursor=x"), &["limit", "cursor"]).is_ok());
        assert!(query_pairs(Some("limit=2&limit=3"), &["limit"]).is_err());
        assert!(query_pairs(Some("evil=1"), &["limit"]).is_err());
        assert!(query_pairs(None, &[]).unwrap().is_empty());
    }

    #[test]
    fn state_and_code_shapes() {
        assert!(state(&"a".repeat(43)).is_ok());
        assert!(state(&"a".repeat(42)).is_err());
        assert!(state(&format!("{}+", "a".repeat(42))).is_err());
        assert!(code("AQabc-_.").is_ok());
        assert!(code("a b").is_err());
        assert!(code("").is_err());
    }
}

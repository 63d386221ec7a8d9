//! The variables every function's configuration reads ([`crate::config::Env::mapillary`] and
//! [`crate::config::Env::tables`]), set to valid local values: the base of each function's config
//! tests, which add their own variables on top.

use std::collections::HashMap;

/// The common variables (tables, token key, Mapillary endpoints and app), valid and local.
pub fn common_env() -> HashMap<&'static str, String> {
    [
        ("RELAY_UPLOADS_TABLE", "uploads"),
        ("RELAY_USERS_TABLE", "users"),
        ("RELAY_IDEMPOTENCY_TABLE", "idem"),
        ("RELAY_TOKEN_KEY_ID", "alias/relay"),
        ("MAPILLARY_GRAPH_URL", "http://127.0.0.1:1/graph/"),
        ("MAPILLARY_UPLOAD_URL", "http://127.0.0.1:1/rupload"),
        ("MAPILLARY_TILES_URL", "http://127.0.0.1:1/tiles"),
        ("MAPILLARY_WWW_URL", "http://127.0.0.1:1/www"),
        ("MAPILLARY_CLIENT_ID", "123"),
        ("MAPILLARY_CLIENT_SECRET", "s3cret"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    #[test]
    fn common_env_satisfies_the_shared_config() {
        let env = common_env();
        let e = Env::new(|k: &str| env.get(k).cloned());
        assert_eq!(e.tables().unwrap().uploads_table, "uploads");
        assert_eq!(e.mapillary().unwrap().endpoints.graph, "http://127.0.0.1:1/graph");
    }
}

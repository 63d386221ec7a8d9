//! The (method, route template) pairs the API serves; `openapi.yaml` documents exactly these.

/// `GET` — the caller's sequences; `POST` — announce a sequence, get presigned upload URLs.
pub const ROUTE_SEQUENCES: &str = "/v1/sequences";
/// `GET` — one sequence; `DELETE` — remove its objects and records.
pub const ROUTE_SEQUENCE: &str = "/v1/sequences/{sequence_id}";
/// `POST` — the announced files are uploaded: write the manifest.
pub const ROUTE_SEQUENCE_COMPLETE: &str = "/v1/sequences/{sequence_id}/complete";
/// `POST` — fresh upload URLs for the announced files not uploaded yet.
pub const ROUTE_SEQUENCE_UPLOADS: &str = "/v1/sequences/{sequence_id}/uploads";
/// `POST` — write the manifest again so that failed uploads run again.
pub const ROUTE_SEQUENCE_RETRY: &str = "/v1/sequences/{sequence_id}/retry";
/// `GET` — one sequence's images.
pub const ROUTE_SEQUENCE_IMAGES: &str = "/v1/sequences/{sequence_id}/images";
/// `POST` — start a Mapillary connection.
pub const ROUTE_CONNECT: &str = "/v1/mapillary/connect";
/// `GET` — Mapillary's redirect back (no JWT).
pub const ROUTE_CALLBACK: &str = "/v1/mapillary/callback";
/// `GET`, `PUT` (hand over an upload token), `DELETE` — the caller's connection.
pub const ROUTE_CONNECTION: &str = "/v1/mapillary/connection";

/// Every (method, route template) the router serves; `openapi.yaml` documents exactly these.
pub const ROUTES: [(&str, &str); 13] = [
    ("GET", ROUTE_SEQUENCES),
    ("POST", ROUTE_SEQUENCES),
    ("GET", ROUTE_SEQUENCE),
    ("DELETE", ROUTE_SEQUENCE),
    ("POST", ROUTE_SEQUENCE_UPLOADS),
    ("POST", ROUTE_SEQUENCE_COMPLETE),
    ("POST", ROUTE_SEQUENCE_RETRY),
    ("GET", ROUTE_SEQUENCE_IMAGES),
    ("POST", ROUTE_CONNECT),
    ("GET", ROUTE_CALLBACK),
    ("GET", ROUTE_CONNECTION),
    ("PUT", ROUTE_CONNECTION),
    ("DELETE", ROUTE_CONNECTION),
];

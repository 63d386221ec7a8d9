//! The Mapillary calls of the poller: [`MapillaryClient`] for OAuth, `/me`, the feed, image entities
//! and `image_ids`; plus the three reads the shared client does not have (batch image entities,
//! image search, coverage tiles), built the same way: errors classified by
//! [`classify_graph`], the URL (which may carry an `access_token`) never in an error message.

use std::time::SystemTime;

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use shared::domain::linking::MapillaryImage;
use shared::domain::tiles::{BBox, TileId, PUBLIC_TILESET};
use shared::mapillary::client::{MapillaryClient, Me, TokenGrant};
use shared::mapillary::error::MapillaryError;
use shared::mapillary::feed::ActivityPage;
use shared::mapillary::retry::classify_graph;

/// Most results of one image search (Mapillary's maximum and default `limit`).
pub const SEARCH_LIMIT: usize = 2000;

/// Entity fields the linking needs.
pub const LINK_FIELDS: &str = "id,sequence,captured_at,geometry,altitude";

/// Mapillary client plus the app's OAuth credentials.
#[derive(Clone)]
pub struct MapillaryApi {
    client: MapillaryClient,
    http: reqwest::Client,
    client_id: String,
    client_secret: SecretString,
}

impl std::fmt::Debug for MapillaryApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapillaryApi")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

fn bad(status: u16, message: impl Into<String>) -> MapillaryError {
    MapillaryError::BadReply {
        status,
        message: message.into(),
    }
}

fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn f64_of(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// An image entity (fields of [`LINK_FIELDS`]) as a linking input; `None` when a field is missing.
pub fn entity_to_image(v: &Value) -> Result<MapillaryImage, String> {
    let id = id_of(v.get("id")).ok_or("image entity has no `id`")?;
    let sequence_id = id_of(v.get("sequence")).ok_or_else(|| format!("image {id} has no `sequence`"))?;
    let captured_at_ms = v
        .get("captured_at")
        .and_then(|c| c.as_i64().or_else(|| c.as_str().and_then(|s| s.parse().ok())))
        .ok_or_else(|| format!("image {id} has no `captured_at`"))?;
    let coords = v
        .get("geometry")
        .and_then(|g| g.get("coordinates"))
        .and_then(Value::as_array)
        .ok_or_else(|| format!("image {id} has no `geometry`"))?;
    let lon = coords.first().and_then(f64_of);
    let lat = coords.get(1).and_then(f64_of);
    let (Some(lon), Some(lat)) = (lon, lat) else {
        return Err(format!("image {id} has unreadable coordinates"));
    };
    Ok(MapillaryImage {
        id,
        sequence_id,
        captured_at_ms,
        lon,
        lat,
        altitude: v.get("altitude").and_then(f64_of),
    })
}

impl MapillaryApi {
    /// Wrap `client` (its endpoints are used for the extra reads too) with the app's credentials.
    pub fn new(
        client: MapillaryClient,
        http: reqwest::Client,
        client_id: impl Into<String>,
        client_secret: SecretString,
    ) -> Self {
        Self {
            client,
            http,
            client_id: client_id.into(),
            client_secret,
        }
    }

    /// The wrapped client.
    pub fn client(&self) -> &MapillaryClient {
        &self.client
    }

    /// OAuth refresh grant with the stored refresh token (or the access token, as JOSM does).
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
        self.client
            .refresh(&self.client_id, &self.client_secret, refresh_token)
            .await
    }

    /// `/me` of a token.
    pub async fn me(&self, token: &SecretString) -> Result<Me, MapillaryError> {
        self.client.me(token).await
    }

    /// One feed page.
    pub async fn feed_page(
        &self,
        token: &SecretString,
        mapillary_user_id: &str,
        first: u32,
        after: Option<&str>,
        hide_after_days: u32,
    ) -> Result<ActivityPage, MapillaryError> {
        self.client
            .latest_activity(token, mapillary_user_id, first, after, hide_after_days)
            .await
    }

    /// The sequence id of an image.
    pub async fn image_sequence(
        &self,
        token: &SecretString,
        image_id: &str,
    ) -> Result<String, MapillaryError> {
        let img = self.client.image(token, image_id, &["id", "sequence"]).await?;
        img.sequence
            .ok_or_else(|| bad(200, format!("image {image_id} has no `sequence`")))
    }

    /// Image ids of a sequence, capture order.
    pub async fn image_ids(
        &self,
        token: &SecretString,
        sequence_id: &str,
    ) -> Result<Vec<String>, MapillaryError> {
        self.client.image_ids(token, sequence_id).await
    }

    async fn get_json(&self, token: &SecretString, url: reqwest::Url) -> Result<Value, MapillaryError> {
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("OAuth {}", token.expose_secret()))
            .map_err(|_| MapillaryError::InvalidInput("token not allowed in an HTTP header".into()))?;
        auth.set_sensitive(true);
        let resp = self
            .http
            .get(url)
            .header(reqwest::header::AUTHORIZATION, auth)
            .timeout(self.client.policy().min_request_timeout)
            .send()
            .await
            .map_err(MapillaryError::from_transport)?;
        let (status, retry_after, body) = read(resp).await?;
        let v: Option<Value> = serde_json::from_slice(&body).ok();
        let has_error = v
            .as_ref()
            .and_then(|v| v.get("error"))
            .is_some_and(Value::is_object);
        if !(200..300).contains(&status) || has_error {
            return Err(classify_graph(
                status,
                retry_after.as_deref(),
                &body,
                SystemTime::now(),
            ));
        }
        v.ok_or_else(|| bad(status, "reply is not JSON"))
    }

    fn graph_url(&self, segment: &str) -> Result<reqwest::Url, MapillaryError> {
        let base = &self.client.endpoints().graph;
        reqwest::Url::parse(&format!("{}/{segment}", base.trim_end_matches('/')))
            .map_err(|e| MapillaryError::InvalidInput(format!("graph endpoint is not a URL: {e}")))
    }

    /// Image entities by id (`GET images?image_ids=…&fields=…`, one request per `batch` ids).
    /// Ids Mapillary does not return are simply absent.
    pub async fn images(
        &self,
        token: &SecretString,
        ids: &[String],
        batch: usize,
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(batch.max(1)) {
            let mut url = self.graph_url("images")?;
            url.query_pairs_mut()
                .append_pair("image_ids", &chunk.join(","))
                .append_pair("fields", LINK_FIELDS);
            out.extend(self.data_images(self.get_json(token, url).await?)?);
        }
        Ok(out)
    }

    /// Images in `bbox` captured between `start_ms` and `end_ms` (`GET images?bbox=…`, one request,
    /// at most 2000 results: Mapillary's search has no pagination).
    pub async fn search(
        &self,
        token: &SecretString,
        bbox: &BBox,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        let mut url = self.graph_url("images")?;
        url.query_pairs_mut()
            .append_pair(
                "bbox",
                &format!("{},{},{},{}", bbox.west, bbox.south, bbox.east, bbox.north),
            )
            .append_pair("start_captured_at", &start_ms.to_string())
            .append_pair("end_captured_at", &end_ms.to_string())
            .append_pair("fields", LINK_FIELDS)
            .append_pair("limit", "2000");
        self.data_images(self.get_json(token, url).await?)
    }

    /// Every image of `sequence_ids` (`GET images?sequence_id=a,b,…&fields=…&limit=2000`, one
    /// request; the protocol's §7.4 search filter). No pagination: a reply of [`SEARCH_LIMIT`]
    /// images may be truncated, and the order is not capture order (callers sort and verify).
    pub async fn images_of_sequences(
        &self,
        token: &SecretString,
        sequence_ids: &[String],
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        let mut url = self.graph_url("images")?;
        url.query_pairs_mut()
            .append_pair("sequence_id", &sequence_ids.join(","))
            .append_pair("fields", LINK_FIELDS)
            .append_pair("limit", &SEARCH_LIMIT.to_string());
        self.data_images(self.get_json(token, url).await?)
    }

    fn data_images(&self, v: Value) -> Result<Vec<MapillaryImage>, MapillaryError> {
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(200, "images reply has no `data` array"))?;
        data.iter()
            .map(|e| entity_to_image(e).map_err(|m| bad(200, m)))
            .collect()
    }

    /// One z/x/y coverage tile of `mly1_public` (token as `access_token`). A tile that does not
    /// exist (403 code 100, or 404) is `None`; 403 code 4 is a rate limit (an error).
    pub async fn tile(&self, token: &SecretString, tile: TileId) -> Result<Option<Bytes>, MapillaryError> {
        let base = self.client.endpoints().tiles.trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!(
            "{base}/maps/vtp/{PUBLIC_TILESET}/2/{}/{}/{}",
            tile.z, tile.x, tile.y
        ))
        .map_err(|e| MapillaryError::InvalidInput(format!("tiles endpoint is not a URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("access_token", token.expose_secret());
        let resp = self
            .http
            .get(url)
            .timeout(self.client.policy().min_request_timeout)
            .send()
            .await
            .map_err(MapillaryError::from_transport)?;
        let (status, retry_after, body) = read(resp).await?;
        if (200..300).contains(&status) {
            return Ok((!body.is_empty()).then_some(body));
        }
        if status == 404 {
            return Ok(None);
        }
        match classify_graph(status, retry_after.as_deref(), &body, SystemTime::now()) {
            MapillaryError::Api {
                status: 403,
                code: Some(100) | None,
                ..
            } => Ok(None),
            e => Err(e),
        }
    }
}

async fn read(resp: reqwest::Response) -> Result<(u16, Option<String>, Bytes), MapillaryError> {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.bytes().await.map_err(MapillaryError::from_transport)?;
    Ok((status, retry_after, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_to_image_reads_strings_and_numbers() {
        let v = serde_json::json!({"id": 148137757289079u64, "sequence": "u8v5JabHqDiGcxVPl7oF3n",
            "captured_at": 1714557600000i64, "geometry": {"type":"Point","coordinates":["16.37","48.2"]},
            "altitude": 187.25});
        let img = entity_to_image(&v).unwrap();
        assert_eq!(img.id, "148137757289079");
        assert_eq!((img.lon, img.lat), (16.37, 48.2));
        assert_eq!(img.altitude, Some(187.25));
        let err = entity_to_image(&serde_json::json!({"id": "1", "sequence": "s"})).unwrap_err();
        assert!(err.contains("captured_at"), "{err}");
    }
}

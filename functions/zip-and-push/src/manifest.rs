//! The trigger contract: `sequences/<user_id>/<sequence_id>/manifest.json` and its JSON.

use serde::Deserialize;

/// Prefix under which producers drop sequences.
pub const SEQUENCES_PREFIX: &str = "sequences/";
/// File name of the manifest (written last).
pub const MANIFEST_NAME: &str = "manifest.json";
/// Largest `max_images_per_upload` a manifest may ask for (the per-sequence cap).
pub const MAX_IMAGES_PER_UPLOAD: usize = 500;

/// The sequence a manifest key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceKey {
    /// User id.
    pub user_id: String,
    /// Sequence id.
    pub sequence_id: String,
}

impl SequenceKey {
    /// `sequences/<user_id>/<sequence_id>/` — every image key of the sequence starts with it.
    pub fn prefix(&self) -> String {
        format!("{SEQUENCES_PREFIX}{}/{}/", self.user_id, self.sequence_id)
    }
}

/// Why a notification key is not a manifest key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not `sequences/<user_id>/<sequence_id>/manifest.json`.
    #[error("key {0:?} is not of the form sequences/<user_id>/<sequence_id>/manifest.json")]
    Shape(String),
    /// An id has characters outside `[A-Za-z0-9._-]`, is longer than 128, or is `.`/`..`.
    #[error("invalid {what} {id:?} in key: ids are 1-128 characters of [A-Za-z0-9._-], not \".\" or \"..\"")]
    BadId {
        /// `user_id` or `sequence_id`.
        what: &'static str,
        /// The id.
        id: String,
    },
}

fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parse a (decoded) manifest key.
pub fn parse_manifest_key(key: &str) -> Result<SequenceKey, KeyError> {
    let shape = || KeyError::Shape(key.to_string());
    let rest = key.strip_prefix(SEQUENCES_PREFIX).ok_or_else(shape)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [user_id, sequence_id, name] = parts.as_slice() else {
        return Err(shape());
    };
    if *name != MANIFEST_NAME {
        return Err(shape());
    }
    for (what, id) in [("user_id", user_id), ("sequence_id", sequence_id)] {
        if !valid_id(id) {
            return Err(KeyError::BadId {
                what,
                id: id.to_string(),
            });
        }
    }
    Ok(SequenceKey {
        user_id: user_id.to_string(),
        sequence_id: sequence_id.to_string(),
    })
}

/// The manifest as written by the producer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// Relative image keys; `None` = every `.jpg`/`.jpeg` under the prefix.
    pub images: Option<Vec<String>>,
    /// Organization to upload for.
    pub organization_id: Option<String>,
    /// Cap per upload (1..=500).
    pub max_images_per_upload: Option<usize>,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(default)]
    images: Option<Vec<String>>,
    #[serde(default)]
    organization_id: Option<String>,
    #[serde(default)]
    max_images_per_upload: Option<u64>,
}

/// Why a manifest is unusable (the whole sequence fails with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("malformed manifest.json: {0}")]
    Json(String),
    /// `max_images_per_upload` outside 1..=500.
    #[error("malformed manifest.json: max_images_per_upload must be between 1 and {MAX_IMAGES_PER_UPLOAD}, got {0}")]
    MaxImages(u64),
    /// `organization_id` empty.
    #[error("malformed manifest.json: organization_id is empty")]
    EmptyOrganization,
}

/// Parse a manifest strictly: known fields must have the right types; unknown fields are ignored.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
    let max = match raw.max_images_per_upload {
        None => None,
        Some(n) if (1..=MAX_IMAGES_PER_UPLOAD as u64).contains(&n) => Some(n as usize),
        Some(n) => return Err(ManifestError::MaxImages(n)),
    };
    if raw
        .organization_id
        .as_deref()
        .is_some_and(|o| o.trim().is_empty())
    {
        return Err(ManifestError::EmptyOrganization);
    }
    Ok(Manifest {
        images: raw.images,
        organization_id: raw.organization_id,
        max_images_per_upload: max,
    })
}

/// Check a relative image key from the manifest: not empty, no leading `/`, no `.`/`..`/empty
/// segment, no backslash. `Err` is the rejection reason.
pub fn check_relative_key(rel: &str) -> Result<(), String> {
    if rel.is_empty() {
        return Err("invalid key: empty".into());
    }
    if rel.starts_with('/') {
        return Err("invalid key: must be relative to the sequence prefix (leading '/')".into());
    }
    if rel.contains('\\') {
        return Err("invalid key: contains a backslash".into());
    }
    for seg in rel.split('/') {
        match seg {
            ".." => return Err("invalid key: contains a '..' path segment".into()),
            "." => return Err("invalid key: contains a '.' path segment".into()),
            "" => return Err("invalid key: contains an empty path segment ('//' or trailing '/')".into()),
            _ => {}
        }
    }
    Ok(())
}

/// Whether a key is picked by default (`.jpg`/`.jpeg`, any case).
pub fn is_default_image(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    (lower.ends_with(".jpg") || lower.ends_with(".jpeg")) && !lower.ends_with(MANIFEST_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_key_is_manifest_should_parse_ids() {
        let k = parse_manifest_key("sequences/user-1/seq_2.a/manifest.json").unwrap();
        assert_eq!(k.user_id, "user-1");
        assert_eq!(k.sequence_id, "seq_2.a");
        assert_eq!(k.prefix(), "sequences/user-1/seq_2.a/");
    }

    #[test]
    fn when_key_is_not_manifest_should_say_why() {
        for k in [
            "sequences/u/s/0.jpg",
            "sequences/u/manifest.json",
            "other/u/s/manifest.json",
            "sequences/u/s/x/manifest.json",
        ] {
            assert!(matches!(parse_manifest_key(k), Err(KeyError::Shape(_))), "{k}");
        }
        for k in [
            "sequences/../s/manifest.json",
            "sequences/u/a b/manifest.json",
            "sequences/u/é/manifest.json",
            "sequences//s/manifest.json",
        ] {
            assert!(
                matches!(parse_manifest_key(k), Err(KeyError::BadId { .. })),
                "{k}"
            );
        }
    }

    #[test]
    fn when_manifest_valid_should_parse_and_ignore_unknown_fields() {
        let m = parse_manifest(
            br#"{"images":["a.jpg","b/c.jpg"],"organization_id":"1","max_images_per_upload":3,"x":1}"#,
        )
        .unwrap();
        assert_eq!(m.images.unwrap(), ["a.jpg", "b/c.jpg"]);
        assert_eq!(m.organization_id.as_deref(), Some("1"));
        assert_eq!(m.max_images_per_upload, Some(3));
        assert_eq!(parse_manifest(b"{}").unwrap(), Manifest::default());
    }

    #[test]
    fn when_manifest_malformed_should_fail_precisely() {
        let e = parse_manifest(b"{\"images\": [").unwrap_err();
        assert!(e.to_string().starts_with("malformed manifest.json: EOF"), "{e}");
        let e = parse_manifest(br#"{"images":[1]}"#).unwrap_err();
        assert!(e.to_string().contains("expected a string"), "{e}");
        assert_eq!(
            parse_manifest(br#"{"max_images_per_upload":0}"#).unwrap_err(),
            ManifestError::MaxImages(0)
        );
        assert_eq!(
            parse_manifest(br#"{"max_images_per_upload":501}"#).unwrap_err(),
            ManifestError::MaxImages(501)
        );
        assert!(parse_manifest(br#"{"organization_id":5}"#).is_err());
    }

    #[test]
    fn relative_keys_are_checked() {
        assert!(check_relative_key("a b+c/ü.jpg").is_ok());
        assert!(check_relative_key("../x.jpg").unwrap_err().contains("'..'"));
        assert!(check_relative_key("a/../../x.jpg").unwrap_err().contains("'..'"));
        assert!(check_relative_key("/x.jpg").unwrap_err().contains("leading"));
        assert!(check_relative_key("").is_err());
        assert!(is_default_image("A/B.JPEG") && is_default_image("x.jpg") && !is_default_image("x.png"));
    }
}

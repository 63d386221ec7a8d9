//! Sequences dropped through the status API (`POST /v1/sequences` … `complete`): what the caller
//! announced, and the pure rules the announcement must follow. The objects land exactly where an
//! operator's S3 drop puts them (`sequences/<user>/<sequence>/<name>`), and `complete` writes the same
//! `manifest.json`, so zip-and-push cannot tell the two paths apart.
//!
//! The announcement is kept beside the sequence record (UploadsTable pk `SEQ#<user>#<sequence>`, sk
//! `ANNOUNCED#<chunk:04>`, [`ANNOUNCED_FILES_PER_ITEM`] files per item) until the sequence is deleted.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Longest file name accepted (bytes).
pub const MAX_NAME_LEN: usize = 200;
/// Files per announcement item (≤ 200-byte names: well below DynamoDB's 400 KB item limit).
pub const ANNOUNCED_FILES_PER_ITEM: usize = 1000;
/// Name of the manifest inside a sequence's prefix (never announced: `complete` writes it).
pub const MANIFEST_NAME: &str = "manifest.json";

/// One announced file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedFile {
    /// Name inside the sequence's prefix (no `/`).
    pub name: String,
    /// Exact size in bytes (bound into the presigned URL).
    pub size: u64,
    /// MD5 of the content, 32 lowercase hex digits, when the caller gave one (bound into the
    /// presigned URL as `Content-MD5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
}

/// What the caller announced for a sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// Owner (the JWT `sub`).
    pub user_id: String,
    /// The sequence id the API issued.
    pub sequence_id: String,
    /// The files, in the order given (the manifest lists them in this order).
    pub files: Vec<AnnouncedFile>,
    /// `organization_id` of the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<String>,
    /// `max_images_per_upload` of the manifest (1–500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_images_per_upload: Option<u32>,
    /// When it was announced.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it expires (`created_at` + `RELAY_ANNOUNCE_TTL_HOURS`): its items carry it as the
    /// table's TTL, and the sequence reads as FAILED after it ([`announcement_expired`]).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
}

/// Whether a sequence announced at `created_at` and still in state `state` has outlived its
/// announcement (`ttl`) at `now`: only a sequence still AWAITING_FILES expires.
pub fn announcement_expired(
    state: crate::model::SequenceState,
    created_at: OffsetDateTime,
    ttl: std::time::Duration,
    now: OffsetDateTime,
) -> bool {
    state == crate::model::SequenceState::AwaitingFiles && now >= created_at + ttl
}

/// The reason an expired announcement's sequence shows (its state reads FAILED).
pub fn expired_reason(ttl: std::time::Duration) -> String {
    format!(
        "announcement expired: the announced files were not completed within {} h \
         (RELAY_ANNOUNCE_TTL_HOURS); the sequence takes no files any more — DELETE it and drop it again",
        ttl.as_secs() / 3600
    )
}

/// Why an announcement is refused (a 400 naming the file or field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    /// No files, or more than the cap.
    #[error("files must list 1 to {max} images, got {got}")]
    Count {
        /// Files given.
        got: usize,
        /// The cap.
        max: usize,
    },
    /// A name breaks the naming rules.
    #[error("file {index}: name {shown:?} {why}")]
    Name {
        /// Position in `files`.
        index: usize,
        /// The name, cut to 64 characters and stripped of control characters.
        shown: String,
        /// Which rule.
        why: &'static str,
    },
    /// The same name twice.
    #[error("file {index}: name {name:?} is listed twice")]
    Duplicate {
        /// Position of the second occurrence.
        index: usize,
        /// The name.
        name: String,
    },
    /// Zero bytes, or larger than the cap.
    #[error("file {index} ({name:?}): size must be 1 to {max} bytes, got {got}")]
    Size {
        /// Position in `files`.
        index: usize,
        /// The name.
        name: String,
        /// Size given.
        got: u64,
        /// The cap.
        max: u64,
    },
    /// `md5` is not 32 hex digits.
    #[error("file {index} ({name:?}): md5 must be 32 hexadecimal digits")]
    Md5 {
        /// Position in `files`.
        index: usize,
        /// The name.
        name: String,
    },
    /// `max_images_per_upload` outside 1–500.
    #[error("max_images_per_upload must be 1 to 500, got {0}")]
    MaxImagesPerUpload(u64),
    /// `organization_id` empty, too long or not digits.
    #[error("organization_id must be 1 to 64 digits (a Mapillary organization id)")]
    Organization,
}

/// `now` as `YYYYMMDD<between>HHMMSS` in its own offset (callers pass UTC): the time part of
/// generated sequence names and ids.
pub fn compact_stamp(now: OffsetDateTime, between: char) -> String {
    format!(
        "{:04}{:02}{:02}{between}{:02}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Whether `name` is a JPEG by its extension (`.jpg`/`.jpeg`, any case) — the images zip-and-push
/// picks by default.
pub fn is_jpeg_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".jpg") || lower.ends_with(".jpeg")
}

/// Check one file name: 1–[`MAX_NAME_LEN`] bytes, no `/` or `\`, no `..`, no control characters,
/// not starting with `.` or a space, a `.jpg`/`.jpeg` extension. `Err` is the broken rule.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err("must be 1 to 200 bytes");
    }
    if name.contains('/') || name.contains('\\') {
        return Err("must not contain '/' or '\\' (one file name, no path)");
    }
    if name.contains("..") {
        return Err("must not contain '..'");
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    if name.starts_with('.') || name.starts_with(' ') || name.ends_with(' ') {
        return Err("must not start with '.' or start or end with a space");
    }
    if !is_jpeg_name(name) {
        return Err("must end in .jpg or .jpeg");
    }
    Ok(())
}

/// A printable excerpt of a refused name.
fn shown(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// `md5` as 32 lowercase hex digits.
pub fn normalize_md5(raw: &str) -> Option<String> {
    (raw.len() == 32 && raw.bytes().all(|b| b.is_ascii_hexdigit())).then(|| raw.to_ascii_lowercase())
}

/// Check the files of an announcement against the caps: 1..=`max_files` files, each name valid and
/// unique, each size 1..=`max_bytes`, each md5 (if any) 32 hex digits. Returns the files with their
/// md5 normalized to lowercase.
pub fn check_files(
    files: Vec<AnnouncedFile>,
    max_files: usize,
    max_bytes: u64,
) -> Result<Vec<AnnouncedFile>, AnnounceError> {
    if files.is_empty() || files.len() > max_files {
        return Err(AnnounceError::Count {
            got: files.len(),
            max: max_files,
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(files.len());
    let mut out = Vec::with_capacity(files.len());
    for (index, mut f) in files.into_iter().enumerate() {
        check_name(&f.name).map_err(|why| AnnounceError::Name {
            index,
            shown: shown(&f.name),
            why,
        })?;
        if !seen.insert(f.name.clone()) {
            return Err(AnnounceError::Duplicate { index, name: f.name });
        }
        if f.size == 0 || f.size > max_bytes {
            return Err(AnnounceError::Size {
                index,
                name: f.name,
                got: f.size,
                max: max_bytes,
            });
        }
        if let Some(raw) = f.md5.take() {
            match normalize_md5(&raw) {
                Some(m) => f.md5 = Some(m),
                None => return Err(AnnounceError::Md5 { index, name: f.name }),
            }
        }
        out.push(f);
    }
    Ok(out)
}

/// Check the manifest options of an announcement.
pub fn check_options(
    organization_id: Option<&str>,
    max_images_per_upload: Option<u64>,
) -> Result<Option<u32>, AnnounceError> {
    if let Some(org) = organization_id {
        if org.is_empty() || org.len() > 64 || !org.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AnnounceError::Organization);
        }
    }
    match max_images_per_upload {
        None => Ok(None),
        Some(n) if (1..=500).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(AnnounceError::MaxImagesPerUpload(n)),
    }
}

/// The `manifest.json` of an announcement, in zip-and-push's format: `images` (the announced
/// names, relative to the prefix, in order), the options, and `drop_id` — a value unique to this
/// write, which zip-and-push ignores but which gives each written manifest its own ETag (so a
/// manifest written again, e.g. by a retry, is a new notification and not a duplicate).
pub fn manifest_json(a: &Announcement, drop_id: &str) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    m.insert(
        "images".into(),
        a.files
            .iter()
            .map(|f| serde_json::Value::from(f.name.clone()))
            .collect(),
    );
    if let Some(org) = &a.organization_id {
        m.insert("organization_id".into(), org.clone().into());
    }
    if let Some(n) = a.max_images_per_upload {
        m.insert("max_images_per_upload".into(), n.into());
    }
    m.insert("drop_id".into(), drop_id.into());
    serde_json::to_vec(&serde_json::Value::Object(m)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64) -> AnnouncedFile {
        AnnouncedFile {
            name: name.into(),
            size,
            md5: None,
        }
    }

    #[test]
    fn names_follow_the_rules() {
        for ok in ["a.jpg", "IMG 0001.JPEG", "ü-é.jpg", "a.b.jpg"] {
            assert_eq!(check_name(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "a/b.jpg",
            "a\\b.jpg",
            "../x.jpg",
            "a..jpg",
            "a\u{0}.jpg",
            "a\n.jpg",
            ".hidden.jpg",
            " a.jpg",
            "a.png",
            "manifest.json",
            "a.jpg.exe",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&format!("{}.jpg", "x".repeat(197))).is_err());
        assert!(check_name(&format!("{}.jpg", "x".repeat(196))).is_ok());
    }

    #[test]
    fn files_are_checked_against_the_caps() {
        assert!(matches!(
            check_files(vec![], 5, 10),
            Err(AnnounceError::Count { got: 0, max: 5 })
        ));
        let three = vec![file("a.jpg", 1), file("b.jpg", 2), file("c.jpg", 3)];
        assert!(matches!(
            check_files(three.clone(), 2, 10),
            Err(AnnounceError::Count { got: 3, max: 2 })
        ));
        assert_eq!(check_files(three.clone(), 3, 10).unwrap(), three);
        assert!(matches!(
            check_files(vec![file("a.jpg", 11)], 3, 10),
            Err(AnnounceError::Size { got: 11, max: 10, .. })
        ));
        assert!(matches!(
            check_files(vec![file("a.jpg", 0)], 3, 10),
            Err(AnnounceError::Size { got: 0, .. })
        ));
        assert!(matches!(
            check_files(vec![file("a.jpg", 1), file("a.jpg", 1)], 3, 10),
            Err(AnnounceError::Duplicate { index: 1, .. })
        ));
        let e = check_files(vec![file("x/../../y.jpg", 1)], 3, 10).unwrap_err();
        assert!(matches!(e, AnnounceError::Name { index: 0, .. }), "{e}");
        let mut f = file("a.jpg", 1);
        f.md5 = Some("0123456789ABCDEF0123456789abcdef".into());
        let out = check_files(vec![f.clone()], 1, 10).unwrap();
        assert_eq!(out[0].md5.as_deref(), Some("0123456789abcdef0123456789abcdef"));
        f.md5 = Some("xyz".into());
        assert!(matches!(
            check_files(vec![f], 1, 10),
            Err(AnnounceError::Md5 { .. })
        ));
    }

    #[test]
    fn options_are_checked() {
        assert_eq!(check_options(None, None), Ok(None));
        assert_eq!(check_options(Some("12345"), Some(500)), Ok(Some(500)));
        assert_eq!(
            check_options(None, Some(501)),
            Err(AnnounceError::MaxImagesPerUpload(501))
        );
        assert_eq!(
            check_options(None, Some(0)),
            Err(AnnounceError::MaxImagesPerUpload(0))
        );
        for bad in ["", "12a", &"1".repeat(65)] {
            assert_eq!(check_options(Some(bad), None), Err(AnnounceError::Organization));
        }
    }

    #[test]
    fn the_manifest_lists_the_files_and_a_unique_drop_id() {
        let a = Announcement {
            user_id: "u".into(),
            sequence_id: "s".into(),
            files: vec![file("b.jpg", 1), file("a.jpg", 2)],
            organization_id: Some("7".into()),
            max_images_per_upload: Some(3),
            created_at: OffsetDateTime::UNIX_EPOCH,
            expires_at: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&manifest_json(&a, "d1")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"images": ["b.jpg", "a.jpg"], "organization_id": "7",
                "max_images_per_upload": 3, "drop_id": "d1"})
        );
        assert_ne!(manifest_json(&a, "d1"), manifest_json(&a, "d2"));
    }

    #[test]
    fn only_a_sequence_awaiting_files_expires_and_at_its_ttl() {
        use crate::model::SequenceState;
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let ttl = std::time::Duration::from_secs(24 * 3600);
        let at = |s: i64| t0 + time::Duration::seconds(s);
        assert!(!announcement_expired(
            SequenceState::AwaitingFiles,
            t0,
            ttl,
            at(24 * 3600 - 1)
        ));
        assert!(announcement_expired(
            SequenceState::AwaitingFiles,
            t0,
            ttl,
            at(24 * 3600)
        ));
        for s in [
            SequenceState::Received,
            SequenceState::Uploading,
            SequenceState::Uploaded,
            SequenceState::Failed,
        ] {
            assert!(!announcement_expired(s, t0, ttl, at(48 * 3600)), "{s:?}");
        }
        assert!(expired_reason(ttl).contains("24 h"), "{}", expired_reason(ttl));
    }
}

//! Our images of an upload (zip-and-push's image entries) as linking inputs. A leaf: both linking
//! paths and the user's linking step read through it, and it imports nothing of the run.

use std::collections::HashMap;

use futures::StreamExt;
use shared::domain::linking::OurImage;
use shared::model::{ImagePosition, TrackingRecord};
use shared::ports::{ImageEntryReader, RepoError};
use tracing::warn;

/// An upload's image entries, in zip order, and the same as linking inputs (index for index).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OurImages {
    /// The entries (what the links are written for).
    pub entries: Vec<ImagePosition>,
    /// The linking inputs.
    pub inputs: Vec<OurImage>,
}

impl OurImages {
    /// The linking inputs of `entries`.
    pub fn of(entries: Vec<ImagePosition>) -> Self {
        let inputs = entries.iter().map(our_image).collect();
        Self { entries, inputs }
    }
}

/// Our images of upload `upload_id`, read with one query of its partition.
pub async fn our_images<U: ImageEntryReader>(uploads: &U, upload_id: &str) -> Result<OurImages, RepoError> {
    let entries: Vec<ImagePosition> = uploads
        .list_images(upload_id)
        .await?
        .iter()
        .map(ImagePosition::from)
        .collect();
    Ok(OurImages::of(entries))
}

/// One image entry as a linking input.
pub fn our_image(e: &ImagePosition) -> OurImage {
    OurImage {
        key: e.key.clone(),
        lat: e.lat,
        lon: e.lon,
        altitude: e.altitude,
        captured_at_ms: i64::try_from(e.captured_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
        heading: e.heading,
    }
}

/// Our images of `records`, in order: by key in batches for every record that knows its
/// `image_count` (and got exactly that many), by a query per upload for the others, `concurrency`
/// queries at a time.
pub async fn our_images_many<'r, U: ImageEntryReader>(
    uploads: &U,
    records: impl IntoIterator<Item = &'r TrackingRecord>,
    concurrency: usize,
) -> Vec<Result<OurImages, RepoError>> {
    let records: Vec<&TrackingRecord> = records.into_iter().collect();
    let keyed: Vec<(String, u32)> = records
        .iter()
        .filter_map(|r| r.image_count.filter(|c| *c > 0).map(|c| (r.upload_id.clone(), c)))
        .collect();
    let mut batched: HashMap<String, Vec<ImagePosition>> = HashMap::new();
    if !keyed.is_empty() {
        match uploads.get_image_positions(&keyed).await {
            Ok(lists) => {
                for ((id, count), images) in keyed.iter().zip(lists) {
                    if images.len() == *count as usize {
                        batched.insert(id.clone(), images);
                    } else {
                        warn!(upload_id = %id, found = images.len(), expected = count,
                            "image entries missing from the batched read: reading the upload's partition");
                    }
                }
            }
            Err(e) => warn!(error = %e, "batched read of image entries failed: one query per upload"),
        }
    }
    futures::stream::iter(records)
        .map(|r| {
            let hit = batched.remove(&r.upload_id);
            async move {
                match hit {
                    Some(entries) => Ok(OurImages::of(entries)),
                    None => our_images(uploads, &r.upload_id).await,
                }
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await
}

//! What both linking paths share: their result ([`Linked`]), their error ([`LinkingError`]), the
//! images of one Mapillary sequence, and when a Mapillary image is near one of ours.

use std::collections::HashMap;

use shared::domain::linking::{
    ImageOutcome, LinkReport, MapillaryImage, MapillarySequence, OurImage, Tolerances,
};
use shared::domain::tiles::{distance_m, LonLat};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::error::MapillaryError;
use shared::mapillary::session::{CallError, SessionError, TokenSession};
use shared::model::{ImageLink, ImagePosition, TrackingRecord};
use shared::ports::RepoError;

use crate::deps::Deps;

/// An upload linked: our image entries and the link report (one outcome per entry, in order).
#[derive(Debug, Clone, PartialEq)]
pub struct Linked {
    /// Our image entries, in zip order.
    pub entries: Vec<ImagePosition>,
    /// What became of each.
    pub report: LinkReport,
}

impl Linked {
    /// The links to store, one per image entry.
    pub fn links(&self) -> Vec<ImageLink> {
        self.entries
            .iter()
            .zip(&self.report.images)
            .map(|(e, li)| ImageLink {
                upload_id: e.upload_id.clone(),
                index: e.index,
                key: e.key.clone(),
                outcome: li.outcome.clone(),
                via: self.report.path,
            })
            .collect()
    }

    /// Record the report on the upload's tracking record (the links themselves are stored with it,
    /// first).
    pub fn apply_to(&self, record: &mut TrackingRecord) {
        let report = &self.report;
        record.sequence_ids = report.sequence_ids.clone();
        record.linked_via = Some(report.path);
        record.linked_count = u32::try_from(report.linked_count()).unwrap_or(u32::MAX);
        record.dropped_count = u32::try_from(report.dropped_count()).unwrap_or(u32::MAX);
        if record.image_id.is_none() {
            record.image_id = report.images.iter().find_map(|i| match &i.outcome {
                ImageOutcome::Linked { image_id, .. } => Some(image_id.clone()),
                _ => None,
            });
        }
    }
}

/// Why linking an upload failed (it is retried next run).
#[derive(Debug, thiserror::Error)]
pub enum LinkingError {
    /// A Mapillary call failed.
    #[error("{0}")]
    Mapillary(MapillaryError),
    /// The token could not be refreshed.
    #[error("{0}")]
    Token(SessionError),
    /// Our records could not be read.
    #[error("records: {0}")]
    Repo(#[from] RepoError),
    /// The alignment refused its inputs.
    #[error("linking: {0}")]
    Link(#[from] shared::domain::linking::LinkError),
    /// Nothing of ours to link.
    #[error("{0}")]
    Nothing(String),
}

/// A Mapillary read with the user's token (refreshed once on a 401, see [`TokenSession::call`]).
impl From<CallError> for LinkingError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Call(e) => LinkingError::Mapillary(e),
            CallError::Refresh(r) => LinkingError::Token(r),
        }
    }
}

/// The images of `sequence_id`, in `image_ids` order (entities batched).
pub async fn sequence_images<D: Deps>(
    d: &D,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    sequence_id: &str,
) -> Result<MapillarySequence, LinkingError> {
    let api = d.mapillary();
    let ids: Vec<String> = tok
        .call(|t| async move { api.image_ids(&t, sequence_id).await })
        .await?;
    let (wanted, batch) = (&ids, d.tunables().entity_batch);
    let imgs: Vec<MapillaryImage> = tok
        .call(|t| async move { api.images(&t, wanted, batch).await })
        .await?;
    let mut by_id: HashMap<String, MapillaryImage> = imgs.into_iter().map(|i| (i.id.clone(), i)).collect();
    let images = ids.iter().filter_map(|id| by_id.remove(id)).collect();
    Ok(MapillarySequence {
        id: sequence_id.to_string(),
        images,
    })
}

/// Whether a Mapillary image is within the tolerances of one of ours (time and distance).
pub fn near(o: &OurImage, m: &MapillaryImage, tol: &Tolerances) -> bool {
    (m.captured_at_ms - o.captured_at_ms).unsigned_abs() <= tol.captured_at_ms.unsigned_abs()
        && distance_m(LonLat::new(o.lon, o.lat), LonLat::new(m.lon, m.lat)) <= tol.distance_m
}

//! What the handlers use: the ports behind [`Deps`], and [`AppDeps`], the composition of them that
//! production ([`crate::compose`]) and the tests (with `shared::fakes`) build.

use shared::mapillary::app::MapillaryApp;
use shared::ports::{
    AccountClaims, ConnectionReader, DropStore, ImageEntryReader, OAuthStateStore, ObjectStore, ObjectWriter,
    SequenceReader, TokenStore, TrackingReader, UploadReader,
};

use crate::config::Settings;

/// What the handlers use.
pub trait Deps: Send + Sync + 'static {
    /// Sequences, uploads and image entries (read; written only for sequences dropped through the
    /// API: announcement, state, deletion).
    type Repo: SequenceReader + UploadReader + ImageEntryReader + DropStore + 'static;
    /// The poller's tracking records, image links and feed health (read only).
    type Tracking: TrackingReader + 'static;
    /// Users' Mapillary tokens (saved and deleted here; shown from their clear metadata only).
    type Tokens: TokenStore + ConnectionReader + AccountClaims + 'static;
    /// OAuth `state` values.
    type States: OAuthStateStore + 'static;
    /// The sequences bucket (presigned uploads, the manifest, deletion).
    type Objects: ObjectStore + ObjectWriter + 'static;
    /// Sequences and uploads.
    fn repo(&self) -> &Self::Repo;
    /// Tracking records.
    fn tracking(&self) -> &Self::Tracking;
    /// Token store.
    fn tokens(&self) -> &Self::Tokens;
    /// OAuth states.
    fn states(&self) -> &Self::States;
    /// The sequences bucket.
    fn objects(&self) -> &Self::Objects;
    /// Mapillary OAuth.
    fn mapillary(&self) -> &MapillaryApp;
    /// Settings.
    fn settings(&self) -> &Settings;
}

/// The production composition (and the tests' with fakes).
#[derive(Debug)]
pub struct AppDeps<R, T, K, S, O> {
    /// Sequences and uploads.
    pub repo: R,
    /// Tracking records.
    pub tracking: T,
    /// Token store.
    pub tokens: K,
    /// OAuth states.
    pub states: S,
    /// The sequences bucket.
    pub objects: O,
    /// Mapillary OAuth.
    pub mapillary: MapillaryApp,
    /// Settings.
    pub settings: Settings,
}

impl<R, T, K, S, O> Deps for AppDeps<R, T, K, S, O>
where
    R: SequenceReader + UploadReader + ImageEntryReader + DropStore + 'static,
    T: TrackingReader + 'static,
    K: TokenStore + ConnectionReader + AccountClaims + 'static,
    S: OAuthStateStore + 'static,
    O: ObjectStore + ObjectWriter + 'static,
{
    type Repo = R;
    type Tracking = T;
    type Tokens = K;
    type States = S;
    type Objects = O;
    fn repo(&self) -> &R {
        &self.repo
    }
    fn tracking(&self) -> &T {
        &self.tracking
    }
    fn tokens(&self) -> &K {
        &self.tokens
    }
    fn states(&self) -> &S {
        &self.states
    }
    fn objects(&self) -> &O {
        &self.objects
    }
    fn mapillary(&self) -> &MapillaryApp {
        &self.mapillary
    }
    fn settings(&self) -> &Settings {
        &self.settings
    }
}

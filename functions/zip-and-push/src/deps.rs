//! What zip-and-push runs on: [`Deps`], the ports and settings of the handler, and
//! [`HandlerDeps`], the usual implementation (one value per port) that `compose` builds for
//! production and the tests build from the in-memory fakes of `shared::fakes`.

use shared::ports::{
    ClusterQueue, IdempotencyStore, ImageEntryStore, IngestErrorLog, IngestRequeue, MapillaryAuth,
    MapillaryUploads, ObjectStore, SequenceStore, TokenStore, UploadStore,
};

use crate::config::Tunables;

/// The ports and settings the handler needs.
pub trait Deps: Send + Sync {
    /// S3.
    type Store: ObjectStore;
    /// DynamoDB records: sequences, uploads, image entries, ingest errors.
    type Repo: SequenceStore + UploadStore + ImageEntryStore + IngestErrorLog;
    /// Manifest claims (idempotency).
    type Claims: IdempotencyStore;
    /// Tokens.
    type Tokens: TokenStore;
    /// Clusters queue.
    type Clusters: ClusterQueue;
    /// Ingest queue (continuations).
    type Requeue: IngestRequeue;
    /// Mapillary: uploads, and refresh for the token session.
    type Mapillary: MapillaryUploads + MapillaryAuth;
    /// S3.
    fn store(&self) -> &Self::Store;
    /// DynamoDB records.
    fn repo(&self) -> &Self::Repo;
    /// Manifest claims.
    fn claims(&self) -> &Self::Claims;
    /// Tokens.
    fn tokens(&self) -> &Self::Tokens;
    /// Clusters queue.
    fn clusters(&self) -> &Self::Clusters;
    /// Ingest queue.
    fn requeue(&self) -> &Self::Requeue;
    /// Mapillary.
    fn mapillary(&self) -> &Self::Mapillary;
    /// Tunables.
    fn tunables(&self) -> &Tunables;
}

/// The usual [`Deps`]: one value per port.
#[derive(Debug, Clone)]
pub struct HandlerDeps<S, R, I, T, C, Q, M> {
    /// S3.
    pub store: S,
    /// DynamoDB records.
    pub repo: R,
    /// Manifest claims.
    pub claims: I,
    /// Tokens.
    pub tokens: T,
    /// Clusters queue.
    pub clusters: C,
    /// Ingest queue.
    pub requeue: Q,
    /// Mapillary.
    pub mapillary: M,
    /// Tunables.
    pub tunables: Tunables,
}

impl<S, R, I, T, C, Q, M> Deps for HandlerDeps<S, R, I, T, C, Q, M>
where
    S: ObjectStore,
    R: SequenceStore + UploadStore + ImageEntryStore + IngestErrorLog,
    I: IdempotencyStore,
    T: TokenStore,
    C: ClusterQueue,
    Q: IngestRequeue,
    M: MapillaryUploads + MapillaryAuth,
{
    type Store = S;
    type Repo = R;
    type Claims = I;
    type Tokens = T;
    type Clusters = C;
    type Requeue = Q;
    type Mapillary = M;
    fn store(&self) -> &S {
        &self.store
    }
    fn repo(&self) -> &R {
        &self.repo
    }
    fn claims(&self) -> &I {
        &self.claims
    }
    fn tokens(&self) -> &T {
        &self.tokens
    }
    fn clusters(&self) -> &C {
        &self.clusters
    }
    fn requeue(&self) -> &Q {
        &self.requeue
    }
    fn mapillary(&self) -> &M {
        &self.mapillary
    }
    fn tunables(&self) -> &Tunables {
        &self.tunables
    }
}

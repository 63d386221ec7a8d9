//! What a run needs, written once: the [`Deps`] trait (one associated type per port, so the bounds
//! are stated here and nowhere else) and [`PollerDeps`], the usual implementation holding one value
//! per port. `compose` builds the production one; the unit tests build one over `shared::fakes`.

use secrecy::SecretString;
use shared::adapters::webhook_http::WebhookSender;
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::session::SessionContext;
use shared::ports::{
    ClaimReader, ClusterInbox, EventPublisher, ImageEntryReader, OutboxStore, ReconcileStore, RunLease,
    SequenceReader, SweepStore, TokenStore, TrackingStore, UploadReader, WebhookQueue, WebhookRegistry,
};

use crate::clock::Clock;
use crate::config::Tunables;

/// The ports and settings of a run.
pub trait Deps: Send + Sync {
    /// Tracking records, links, feed health, the run lease, the FINISH_UNCERTAIN scan, the outbox
    /// of status-change events, the queue of webhook deliveries.
    type Tracking: TrackingStore + RunLease + ReconcileStore + OutboxStore + WebhookQueue;
    /// zip-and-push's records (sequences, upload records and image entries): read, and settled by
    /// the sweep of stuck uploads.
    type Uploads: UploadReader + ImageEntryReader + SequenceReader + SweepStore;
    /// zip-and-push's manifest claims, read only (the sweep leaves claimed sequences alone).
    type Claims: ClaimReader;
    /// Users' tokens and webhook registrations (with their secrets).
    type Tokens: TokenStore + WebhookRegistry;
    /// The clusters queue.
    type Inbox: ClusterInbox;
    /// Where status-change events are published (the event bus).
    type Events: EventPublisher;
    /// Tracking records, links, feed health, the run lease.
    fn tracking(&self) -> &Self::Tracking;
    /// zip-and-push's records.
    fn uploads(&self) -> &Self::Uploads;
    /// Users' tokens.
    fn tokens(&self) -> &Self::Tokens;
    /// The clusters queue.
    fn inbox(&self) -> &Self::Inbox;
    /// Manifest claims.
    fn claims(&self) -> &Self::Claims;
    /// The event bus.
    fn events(&self) -> &Self::Events;
    /// Webhook delivery (HTTP, SSRF policy, backoff and failure limit).
    fn webhooks(&self) -> &WebhookSender;
    /// Mapillary (every call of the run goes through it).
    fn mapillary(&self) -> &MapillaryApp;
    /// The web-app client token the activity feed is tried with first (see `crate::feed`), if
    /// configured.
    fn feed_token(&self) -> Option<&SecretString>;
    /// Tunables.
    fn tunables(&self) -> &Tunables;
    /// "Now" of the tracking rules and of token expiry.
    fn clock(&self) -> &Clock;

    /// What the run's token sessions share: the token store, Mapillary, the refresh margin and the
    /// run's clock.
    fn token_context(&self) -> SessionContext<'_, Self::Tokens, MapillaryApp> {
        SessionContext::new(
            self.tokens(),
            self.mapillary(),
            self.tunables().token_refresh_margin,
        )
        .with_clock(self.clock())
    }
}

/// The usual [`Deps`]: one value per port (the production one is `compose::ProductionPoller`;
/// tests swap single fields, e.g. the clock that follows the simulator).
#[derive(Debug, Clone)]
pub struct PollerDeps<R, U, T, Q, C, E> {
    /// Tracking records, links, feed health, the run lease.
    pub tracking: R,
    /// zip-and-push's records (upload records and image entries).
    pub uploads: U,
    /// Users' tokens.
    pub tokens: T,
    /// The clusters queue.
    pub inbox: Q,
    /// Manifest claims (the IdempotencyTable, read only).
    pub claims: C,
    /// The event bus (`RELAY_EVENT_BUS`).
    pub events: E,
    /// Webhook delivery (`RELAY_WEBHOOK_*`).
    pub webhooks: WebhookSender,
    /// Mapillary.
    pub mapillary: MapillaryApp,
    /// The web-app client token (`MAPILLARY_FEED_TOKEN[_SECRET_ARN]`, resolved), if configured.
    pub feed_token: Option<SecretString>,
    /// Tunables.
    pub tunables: Tunables,
    /// "Now".
    pub clock: Clock,
}

impl<R, U, T, Q, C, E> Deps for PollerDeps<R, U, T, Q, C, E>
where
    R: TrackingStore + RunLease + ReconcileStore + OutboxStore + WebhookQueue,
    U: UploadReader + ImageEntryReader + SequenceReader + SweepStore,
    T: TokenStore + WebhookRegistry,
    Q: ClusterInbox,
    C: ClaimReader,
    E: EventPublisher,
{
    type Tracking = R;
    type Uploads = U;
    type Tokens = T;
    type Inbox = Q;
    type Claims = C;
    type Events = E;
    fn tracking(&self) -> &R {
        &self.tracking
    }
    fn uploads(&self) -> &U {
        &self.uploads
    }
    fn tokens(&self) -> &T {
        &self.tokens
    }
    fn inbox(&self) -> &Q {
        &self.inbox
    }
    fn claims(&self) -> &C {
        &self.claims
    }
    fn events(&self) -> &E {
        &self.events
    }
    fn webhooks(&self) -> &WebhookSender {
        &self.webhooks
    }
    fn mapillary(&self) -> &MapillaryApp {
        &self.mapillary
    }
    fn feed_token(&self) -> Option<&SecretString> {
        self.feed_token.as_ref()
    }
    fn tunables(&self) -> &Tunables {
        &self.tunables
    }
    fn clock(&self) -> &Clock {
        &self.clock
    }
}

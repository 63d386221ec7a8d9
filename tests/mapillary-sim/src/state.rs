//! The simulator's world: apps, users, tokens, organizations, clusters, sequences and images,
//! and the processing model that moves clusters through their four stages on the simulator clock.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;
use serde_json::Value;

use crate::config::{ProcessingPlan, Settings};
use crate::content::{ImageMeta, Rejected};
use crate::faults::FaultRule;
use crate::ids::IdGen;

/// Stage field names in processing order.
pub const STAGE_FIELDS: [&str; 4] = [
    "status",
    "initial_processing_status",
    "anonymization_status",
    "tiler_status",
];

/// A registered OAuth app.
#[derive(Debug, Clone, Serialize)]
pub struct App {
    pub id: String,
    pub name: String,
    #[serde(skip)]
    pub secret: String,
    #[serde(skip)]
    pub client_token: String,
    pub redirect_uris: Vec<String>,
}

/// A Mapillary user.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub username: String,
    #[serde(skip)]
    pub email: Option<String>,
    #[serde(skip)]
    pub password: Option<String>,
}

/// An organization.
#[derive(Debug, Clone, Serialize)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub description: String,
    /// Ids of the users who may upload into it ([`crate::Settings::finish_checks_org_membership`]).
    pub members: std::collections::BTreeSet<String>,
}

/// A user access token. Two kinds exist: **OAuth tokens** (`oauth_app` set), issued by `POST /graph/token`
/// to an app, and **user upload tokens** (`oauth_app` `None`): what `POST /graph/login` issues and
/// `mapillary_tools authenticate` stores as `user_upload_token` (also the seeded
/// [`crate::defaults::DEMO_USER_TOKEN`] and admin-made tokens without `oauth`). Only the second kind
/// uploads when [`crate::Settings::oauth_tokens_can_upload`] is off.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub user_id: String,
    /// App that issued it through OAuth (`None` for user upload tokens: seeded and `/login` tokens).
    pub oauth_app: Option<String>,
    pub issued_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
}

/// A `/connect` authorization code.
#[derive(Debug, Clone)]
pub struct AuthCode {
    pub app_id: String,
    pub user_id: String,
    pub expires_at_ms: i64,
    pub used: bool,
}

/// What a presented token turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenClass {
    None,
    User { user_id: String, oauth: bool },
    Client { app_id: String },
    Expired { user_id: String },
    Revoked,
    Unknown,
}

impl TokenClass {
    /// Short label for the request log.
    pub fn label(&self) -> &'static str {
        match self {
            TokenClass::None => "none",
            TokenClass::User { oauth: true, .. } => "user_oauth",
            TokenClass::User { oauth: false, .. } => "user",
            TokenClass::Client { .. } => "client",
            TokenClass::Expired { .. } => "expired",
            TokenClass::Revoked => "revoked",
            TokenClass::Unknown => "unknown",
        }
    }

    /// The user behind the token, even when it is expired.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            TokenClass::User { user_id, .. } | TokenClass::Expired { user_id } => Some(user_id),
            _ => None,
        }
    }
}

/// Where an image's bytes live.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageSource {
    ZipEntry { upload_key: String, entry_name: String },
    Upload { upload_key: String },
}

/// An accepted image waiting for stage 2.
#[derive(Debug, Clone, Serialize)]
pub struct PendingImage {
    pub name: String,
    pub meta: ImageMeta,
    pub source: ImageSource,
}

/// The outcome of the content check done at `finish_upload`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ClusterContent {
    Images {
        images: Vec<PendingImage>,
        rejected: Vec<Rejected>,
    },
    /// Processing fails at stage 1 with this code.
    Invalid {
        error_code: String,
        reason: String,
        rejected: Vec<Rejected>,
    },
}

/// One `finish_upload` call.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub id: String,
    pub owner_id: String,
    pub organization_id: Option<String>,
    pub file_type: String,
    pub file_handle: String,
    pub upload_key: String,
    pub created_at_ms: i64,
    pub plan: ProcessingPlan,
    /// Server-side sequence cap in force when the cluster was created.
    pub sequence_cap: usize,
    pub content: ClusterContent,
    pub sequence_ids: Vec<String>,
    pub materialized: bool,
}

/// Stage values of a cluster at some instant.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub stages: [String; 4],
    pub error_code: String,
    /// Index of the first unfinished stage (4 = all finished).
    pub current: usize,
    pub failed: bool,
    /// When stage 2 finishes (or finished); `None` if it never will.
    pub stage2_done_at_ms: Option<i64>,
}

impl Cluster {
    fn effective_fail(&self) -> Option<(usize, String)> {
        if let ClusterContent::Invalid { error_code, .. } = &self.content {
            return Some((0, error_code.clone()));
        }
        self.plan
            .fail
            .as_ref()
            .map(|f| (usize::from(f.stage.clamp(1, 4)) - 1, f.error_code.clone()))
    }

    /// Stage values at `now_ms`.
    pub fn progress(&self, now_ms: i64) -> Progress {
        let fail = self.effective_fail();
        let mut deadline = self.created_at_ms;
        let mut current = 4;
        let mut failed_code = None;
        let mut stage2_done_at_ms = None;
        for i in 0..4 {
            let secs = i64::try_from(self.plan.stage_seconds[i]).unwrap_or(i64::MAX / 2000);
            deadline = deadline.saturating_add(secs.saturating_mul(1000));
            let fails_here = fail.as_ref().is_some_and(|(s, _)| *s == i);
            let stuck = self.plan.stuck_at.is_some_and(|s| usize::from(s) == i + 1);
            if fails_here {
                current = i;
                if now_ms >= deadline {
                    failed_code = fail.as_ref().map(|(_, c)| c.clone());
                }
                break;
            }
            if stuck {
                current = i;
                break;
            }
            if i == 1 {
                stage2_done_at_ms = Some(deadline);
            }
            if now_ms < deadline {
                current = i;
                break;
            }
        }
        let later = self
            .plan
            .not_started_value
            .clone()
            .unwrap_or_else(|| "IN_PROGRESS".to_string());
        let stages = std::array::from_fn(|i| {
            if i < current {
                "FINISHED".to_string()
            } else if i == current {
                if failed_code.is_some() {
                    self.plan.failed_value.clone()
                } else {
                    "IN_PROGRESS".to_string()
                }
            } else {
                later.clone()
            }
        });
        Progress {
            stages,
            failed: failed_code.is_some(),
            error_code: failed_code.unwrap_or_else(|| "UNSET".to_string()),
            current,
            stage2_done_at_ms,
        }
    }

    /// Whether stage 2 has finished (images and sequences exist).
    pub fn stage2_done(&self, now_ms: i64) -> bool {
        self.progress(now_ms).current >= 2
    }

    /// Whether the cluster's sequences are visible in coverage tiles (stage 4 finished).
    pub fn tiles_visible(&self, now_ms: i64) -> bool {
        self.progress(now_ms).current >= 4
    }

    /// Accepted images (before stage 2 these are pending).
    pub fn accepted_count(&self) -> usize {
        match &self.content {
            ClusterContent::Images { images, .. } => images.len(),
            ClusterContent::Invalid { .. } => 0,
        }
    }

    /// Earliest capture time of the accepted images, ms.
    pub fn first_capture_ms(&self) -> Option<i64> {
        match &self.content {
            ClusterContent::Images { images, .. } => images.iter().map(|i| i.meta.captured_at_ms).min(),
            ClusterContent::Invalid { .. } => None,
        }
    }
}

/// A server-side sequence.
#[derive(Debug, Clone, Serialize)]
pub struct Sequence {
    pub id: String,
    pub cluster_id: String,
    pub owner_id: String,
    pub organization_id: Option<String>,
    /// Image ids in capture order.
    pub image_ids: Vec<String>,
    /// When stage 2 finished.
    pub created_at_ms: i64,
    pub is_pano: bool,
    /// `[min lon, min lat, max lon, max lat]` of the images' original positions (tiles skip
    /// sequences far from the requested tile without visiting their images).
    #[serde(skip)]
    pub bbox: [f64; 4],
}

/// A server-side image.
#[derive(Debug, Clone, Serialize)]
pub struct Image {
    pub id: String,
    pub sequence_id: String,
    pub cluster_id: String,
    pub owner_id: String,
    pub organization_id: Option<String>,
    pub name: String,
    pub meta: ImageMeta,
    pub source: ImageSource,
    pub is_pano: bool,
}

/// One logged request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestLogEntry {
    pub seq: u64,
    pub at_ms: i64,
    pub method: String,
    pub path: String,
    /// Reply status; `None` when the connection was dropped without a reply.
    pub status: Option<u16>,
    pub token_kind: String,
    pub user_id: Option<String>,
    /// The app whose client token was presented (`token_kind: "client"`), so a log reader can tell the
    /// web app's token (`defaults::WEB_APP_ID`) from an OAuth app's.
    pub client_app_id: Option<String>,
    pub fault_rule: Option<u64>,
    /// The `Offset` request header, when present (rupload POST).
    pub offset_header: Option<String>,
    /// Route-specific facts: rupload GET `{"offset": n}`; rupload POST `{"start": n, "bytes_received": n}`.
    pub detail: Option<serde_json::Value>,
}

/// Everything mutable, behind one lock.
#[derive(Debug)]
pub struct State {
    pub ids: IdGen,
    pub settings: Settings,
    pub apps: BTreeMap<String, App>,
    pub users: BTreeMap<String, User>,
    pub orgs: BTreeMap<String, Org>,
    pub tokens: HashMap<String, TokenRecord>,
    /// Separate refresh tokens (only with `refresh_token_field`) → access token they refresh.
    pub refresh_tokens: HashMap<String, String>,
    pub codes: HashMap<String, AuthCode>,
    /// Clusters in creation order.
    pub clusters: Vec<Cluster>,
    pub sequences: BTreeMap<String, Sequence>,
    pub images: BTreeMap<String, Image>,
    /// Plans for the next clusters, used first-in first-out.
    pub next_plans: VecDeque<ProcessingPlan>,
    pub faults: Vec<FaultRule>,
    pub next_fault_id: u64,
    pub request_log: Vec<RequestLogEntry>,
    pub logging_events: Vec<Value>,
    /// Lookup indexes over `clusters` (kept in step by [`State::sync_index`]).
    index: ClusterIndex,
}

/// Indexes over [`State::clusters`], so that a feed page, a cluster lookup and the per-request refresh
/// do not scan every cluster (the poller benchmark tracks 10,000). Clusters are only ever appended
/// and their id and owner never change, so the index catches up from a watermark.
#[derive(Debug, Default)]
struct ClusterIndex {
    /// `clusters[..seen]` are indexed.
    seen: usize,
    by_id: HashMap<String, usize>,
    by_owner: HashMap<String, Vec<usize>>,
    /// Indexed clusters not materialized yet.
    unmaterialized: Vec<usize>,
}

impl State {
    pub fn new(seed: u64, settings: Settings) -> Self {
        Self {
            ids: IdGen::new(seed),
            settings,
            apps: BTreeMap::new(),
            users: BTreeMap::new(),
            orgs: BTreeMap::new(),
            tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            codes: HashMap::new(),
            clusters: Vec::new(),
            sequences: BTreeMap::new(),
            images: BTreeMap::new(),
            next_plans: VecDeque::new(),
            faults: Vec::new(),
            next_fault_id: 1,
            request_log: Vec::new(),
            logging_events: Vec::new(),
            index: ClusterIndex::default(),
        }
    }

    /// Index the clusters appended since the last call.
    fn sync_index(&mut self) {
        let idx = &mut self.index;
        for (i, c) in self.clusters.iter().enumerate().skip(idx.seen) {
            idx.by_id.insert(c.id.clone(), i);
            idx.by_owner.entry(c.owner_id.clone()).or_default().push(i);
            if !c.materialized {
                idx.unmaterialized.push(i);
            }
        }
        idx.seen = self.clusters.len();
    }

    /// The clusters of `owner_id`, in creation order.
    pub fn clusters_of<'a>(&'a self, owner_id: &'a str) -> impl Iterator<Item = &'a Cluster> + 'a {
        let seen = self.index.seen.min(self.clusters.len());
        let indexed = self
            .index
            .by_owner
            .get(owner_id)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.clusters.get(i));
        let fresh = self.clusters[seen..]
            .iter()
            .filter(move |c| c.owner_id == owner_id);
        indexed.chain(fresh)
    }

    /// Seed the apps, user and organization of [`crate::defaults`].
    pub fn seed_defaults(&mut self, now_ms: i64) {
        use crate::defaults as d;
        self.apps.insert(
            d::APP_ID.to_string(),
            App {
                id: d::APP_ID.to_string(),
                name: "mapillary-relay (sim)".to_string(),
                secret: d::CLIENT_SECRET.to_string(),
                client_token: d::CLIENT_TOKEN.to_string(),
                redirect_uris: vec![d::REDIRECT_URI.to_string()],
            },
        );
        self.apps.insert(
            d::WEB_APP_ID.to_string(),
            App {
                id: d::WEB_APP_ID.to_string(),
                name: "Mapillary web app (sim)".to_string(),
                secret: d::WEB_APP_CLIENT_SECRET.to_string(),
                client_token: d::WEB_APP_CLIENT_TOKEN.to_string(),
                redirect_uris: Vec::new(),
            },
        );
        self.users.insert(
            d::DEMO_USER_ID.to_string(),
            User {
                id: d::DEMO_USER_ID.to_string(),
                username: d::DEMO_USERNAME.to_string(),
                email: Some(d::DEMO_EMAIL.to_string()),
                password: Some(d::DEMO_PASSWORD.to_string()),
            },
        );
        self.tokens.insert(
            d::DEMO_USER_TOKEN.to_string(),
            TokenRecord {
                user_id: d::DEMO_USER_ID.to_string(),
                oauth_app: None,
                issued_at_ms: now_ms,
                expires_at_ms: Some(now_ms + d::DEMO_USER_TOKEN_LIFETIME_SECONDS * 1000),
                revoked: false,
            },
        );
        self.orgs.insert(
            d::DEMO_ORG_ID.to_string(),
            Org {
                id: d::DEMO_ORG_ID.to_string(),
                name: d::DEMO_ORG_NAME.to_string(),
                slug: d::DEMO_ORG_SLUG.to_string(),
                description: "Seeded by mapillary-sim".to_string(),
                members: [d::DEMO_USER_ID.to_string()].into(),
            },
        );
    }

    /// Classify a presented token at `now_ms`.
    pub fn classify(&self, token: Option<&str>, now_ms: i64) -> TokenClass {
        let Some(t) = token else { return TokenClass::None };
        if let Some(rec) = self.tokens.get(t) {
            if rec.revoked {
                return TokenClass::Revoked;
            }
            if rec.expires_at_ms.is_some_and(|e| now_ms >= e) {
                return TokenClass::Expired {
                    user_id: rec.user_id.clone(),
                };
            }
            return TokenClass::User {
                user_id: rec.user_id.clone(),
                oauth: rec.oauth_app.is_some(),
            };
        }
        if let Some(app) = self.apps.values().find(|a| a.client_token == t) {
            return TokenClass::Client {
                app_id: app.id.clone(),
            };
        }
        TokenClass::Unknown
    }

    /// Issue a user token.
    pub fn issue_token(
        &mut self,
        user_id: &str,
        oauth_app: Option<String>,
        lifetime_s: i64,
        now_ms: i64,
    ) -> String {
        let token = self.ids.token("MLYAR", 48);
        self.tokens.insert(
            token.clone(),
            TokenRecord {
                user_id: user_id.to_string(),
                oauth_app,
                issued_at_ms: now_ms,
                expires_at_ms: Some(now_ms.saturating_add(lifetime_s.saturating_mul(1000))),
                revoked: false,
            },
        );
        token
    }

    /// A user by id or username.
    pub fn find_user(&self, id_or_name: &str) -> Option<&User> {
        self.users
            .get(id_or_name)
            .or_else(|| self.users.values().find(|u| u.username == id_or_name))
    }

    /// The cluster with this id.
    pub fn cluster(&self, id: &str) -> Option<&Cluster> {
        self.cluster_index(id).and_then(|i| self.clusters.get(i))
    }

    /// The position of the cluster with this id in `clusters`.
    pub fn cluster_index(&self, id: &str) -> Option<usize> {
        match self.index.by_id.get(id) {
            Some(&i) if self.clusters.get(i).is_some_and(|c| c.id == id) => Some(i),
            _ => {
                let seen = self.index.seen.min(self.clusters.len());
                self.clusters[seen..]
                    .iter()
                    .position(|c| c.id == id)
                    .map(|p| p + seen)
            }
        }
    }

    /// Create sequences and images for every cluster whose stage 2 has finished by `now_ms`.
    pub fn refresh(&mut self, now_ms: i64) {
        self.sync_index();
        let candidates = std::mem::take(&mut self.index.unmaterialized);
        let mut waiting = Vec::new();
        for ci in candidates {
            let Some(cluster) = self.clusters.get(ci) else {
                continue;
            };
            if cluster.materialized {
                continue;
            }
            let progress = cluster.progress(now_ms);
            if progress.current < 2 {
                waiting.push(ci);
                continue;
            }
            let created_at = progress.stage2_done_at_ms.unwrap_or(now_ms);
            let mut pending = match &cluster.content {
                ClusterContent::Images { images, .. } => images.clone(),
                ClusterContent::Invalid { .. } => Vec::new(),
            };
            // Stable: equal capture times keep archive / manifest order.
            pending.sort_by_key(|p| p.meta.captured_at_ms);
            let groups = split_groups(
                pending.len(),
                cluster.sequence_cap.max(1),
                cluster.plan.split_into,
            );
            let (cid, owner, org) = (
                cluster.id.clone(),
                cluster.owner_id.clone(),
                cluster.organization_id.clone(),
            );
            let mut iter = pending.into_iter();
            let mut seq_ids = Vec::new();
            for size in groups {
                let seq_id = self.ids.sequence_key();
                let mut image_ids = Vec::with_capacity(size);
                let mut bbox = [f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY];
                for p in iter.by_ref().take(size) {
                    bbox = [
                        bbox[0].min(p.meta.lon),
                        bbox[1].min(p.meta.lat),
                        bbox[2].max(p.meta.lon),
                        bbox[3].max(p.meta.lat),
                    ];
                    let image_id = self.ids.numeric();
                    image_ids.push(image_id.clone());
                    self.images.insert(
                        image_id.clone(),
                        Image {
                            id: image_id,
                            sequence_id: seq_id.clone(),
                            cluster_id: cid.clone(),
                            owner_id: owner.clone(),
                            organization_id: org.clone(),
                            name: p.name,
                            meta: p.meta,
                            source: p.source,
                            is_pano: false,
                        },
                    );
                }
                self.sequences.insert(
                    seq_id.clone(),
                    Sequence {
                        id: seq_id.clone(),
                        cluster_id: cid.clone(),
                        owner_id: owner.clone(),
                        organization_id: org.clone(),
                        image_ids,
                        created_at_ms: created_at,
                        is_pano: false,
                        bbox,
                    },
                );
                seq_ids.push(seq_id);
            }
            let cluster = &mut self.clusters[ci];
            cluster.sequence_ids = seq_ids;
            cluster.materialized = true;
        }
        self.index.unmaterialized = waiting;
    }

    /// First image of the cluster's first sequence (after stage 2).
    pub fn cluster_first_image(&self, cluster: &Cluster) -> Option<&Image> {
        let seq = self.sequences.get(cluster.sequence_ids.first()?)?;
        self.images.get(seq.image_ids.first()?)
    }
}

/// Sizes of the sequences a cluster of `n` images becomes.
pub fn split_groups(n: usize, cap: usize, split_into: Option<usize>) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let parts = match split_into {
        Some(k) if k > 0 => k.min(n).max(n.div_ceil(cap)),
        _ => n.div_ceil(cap),
    };
    if split_into.is_none() {
        // Fill each sequence up to the cap; the last takes the rest.
        let mut v = vec![cap; n / cap];
        if n % cap != 0 {
            v.push(n % cap);
        }
        return v;
    }
    let base = n / parts;
    let extra = n % parts;
    (0..parts).map(|i| base + usize::from(i < extra)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FailurePlan;

    fn cluster(plan: ProcessingPlan) -> Cluster {
        Cluster {
            id: "1".into(),
            owner_id: "u".into(),
            organization_id: None,
            file_type: "zip".into(),
            file_handle: "h".into(),
            upload_key: "k".into(),
            created_at_ms: 0,
            plan,
            sequence_cap: 1000,
            content: ClusterContent::Images {
                images: Vec::new(),
                rejected: Vec::new(),
            },
            sequence_ids: Vec::new(),
            materialized: false,
        }
    }

    #[test]
    fn index_follows_appended_clusters_and_refresh_materializes_each_once() {
        let mut w = State::new(7, Settings::default());
        let plan = ProcessingPlan {
            stage_seconds: [10, 10, 10, 10],
            ..ProcessingPlan::default()
        };
        let mut a = cluster(plan.clone());
        a.id = "a".into();
        w.clusters.push(a);
        w.refresh(0); // indexes "a"; not due yet
        assert!(!w.clusters[0].materialized);
        let mut b = cluster(plan);
        b.id = "b".into();
        b.owner_id = "v".into();
        w.clusters.push(b); // appended after the last refresh: found without it
        assert_eq!(w.cluster("b").map(|c| c.owner_id.as_str()), Some("v"));
        assert_eq!(w.cluster("a").map(|c| c.owner_id.as_str()), Some("u"));
        assert!(w.cluster("c").is_none());
        let ids = |w: &State, o: &str| w.clusters_of(o).map(|c| c.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&w, "u"), ["a"]);
        assert_eq!(ids(&w, "v"), ["b"]);
        w.refresh(19_999); // stage 2 ends at 20 s
        assert!(w.clusters.iter().all(|c| !c.materialized));
        w.refresh(20_000);
        assert!(w.clusters.iter().all(|c| c.materialized));
        assert!(w.index.unmaterialized.is_empty());
        assert_eq!(ids(&w, "v"), ["b"]);
    }

    #[test]
    fn split_by_cap_fills_sequences() {
        assert_eq!(split_groups(2500, 1000, None), vec![1000, 1000, 500]);
        assert_eq!(split_groups(1000, 1000, None), vec![1000]);
        assert_eq!(split_groups(7, 500, Some(3)), vec![3, 2, 2]);
        assert_eq!(split_groups(2, 500, Some(5)), vec![1, 1]);
        assert_eq!(split_groups(0, 500, None), Vec::<usize>::new());
    }

    #[test]
    fn stages_advance_in_order_and_fail_as_planned() {
        let plan = ProcessingPlan {
            stage_seconds: [10, 10, 10, 10],
            ..ProcessingPlan::default()
        };
        let c = cluster(plan.clone());
        assert_eq!(c.progress(0).stages, ["IN_PROGRESS"; 4].map(String::from));
        let p = c.progress(25_000);
        assert_eq!(p.current, 2);
        assert_eq!(p.stages[1], "FINISHED");
        assert_eq!(p.stages[2], "IN_PROGRESS");
        assert_eq!(c.progress(40_000).stages, ["FINISHED"; 4].map(String::from));

        let failing = cluster(ProcessingPlan {
            fail: Some(FailurePlan {
                stage: 3,
                error_code: "E42".into(),
            }),
            not_started_value: Some("NOT_STARTED".into()),
            ..plan
        });
        let p = failing.progress(1_000_000);
        assert!(p.failed);
        assert_eq!(p.error_code, "E42");
        assert_eq!(
            p.stages.clone().map(|s| s),
            ["FINISHED", "FINISHED", "FAILED", "NOT_STARTED"].map(String::from)
        );
    }
}

//! The deterministic seed data: one OAuth app, the "web app" client, a demo user and organization.
//!
//! The local stack and the tests use these values; they are fake and only valid against the simulator.

/// Numeric client id of the seeded OAuth app.
pub const APP_ID: &str = "7131456283729411";
/// Client secret of the seeded app (sent as `Authorization: OAuth <secret>` to `/graph/token`).
pub const CLIENT_SECRET: &str = "MLY|7131456283729411|sim0secret0b1a7f4c2e9d8a6b3f5e1c7d";
/// Client token of the seeded app (`MLY|<app_id>|<hash>`).
pub const CLIENT_TOKEN: &str = "MLY|7131456283729411|5f0c1e2d3b4a69788796a5b4c3d2e1f0";
/// Redirect URI registered for the seeded app (any loopback redirect is also accepted by default).
pub const REDIRECT_URI: &str = "http://127.0.0.1:8787/oauth/callback";

/// App id of the designated "Mapillary web app".
pub const WEB_APP_ID: &str = "2700000000000001";
/// Client token of the designated web app (the only one accepted in `web_app_only` GraphQL mode).
pub const WEB_APP_CLIENT_TOKEN: &str = "MLY|2700000000000001|0e1d2c3b4a5968778695a4b3c2d1e0f9";
/// Client secret of the web app.
pub const WEB_APP_CLIENT_SECRET: &str = "MLY|2700000000000001|sim0secret0web0app0000000000000";

/// Demo user id (numeric string).
pub const DEMO_USER_ID: &str = "104214208486349";
/// Demo user name.
pub const DEMO_USERNAME: &str = "demo_mapper";
/// Long-lived user token of the demo user (like a `mapillary_tools` upload token; not OAuth-issued).
pub const DEMO_USER_TOKEN: &str = "MLYARSIMdemo0user0token0aB3dE5fG7hJ9kL1mN3pQ5rS7tU9v";
/// Lifetime of [`DEMO_USER_TOKEN`] in simulator seconds (about 10 years).
pub const DEMO_USER_TOKEN_LIFETIME_SECONDS: i64 = 10 * 365 * 24 * 3600;
/// Demo user e-mail for `POST /graph/login`.
pub const DEMO_EMAIL: &str = "demo@example.invalid";
/// Demo user password for `POST /graph/login`.
pub const DEMO_PASSWORD: &str = "demo-password";

/// Demo organization id.
pub const DEMO_ORG_ID: &str = "1234567890";
/// Demo organization name.
pub const DEMO_ORG_NAME: &str = "Demo Organization";
/// Demo organization slug.
pub const DEMO_ORG_SLUG: &str = "demo-org";

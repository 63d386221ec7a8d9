//! Tokens, client secrets, codes and states never reach the logs: the whole OAuth flow (success and
//! failure paths) runs with a TRACE-level subscriber capturing every line, which is then scanned.
//! Its own test binary: the subscriber is process-global, so no other test can race its callsites.

use std::io::Write;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use mapillary_sim::{defaults, SimConfig, Simulator};
use secrecy::{ExposeSecret, SecretString};
use shared::fakes::{MemRepo, MemStates, MemStore, MemTokens, MemTracking};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::Endpoints;
use shared::ports::TokenStore;
use status_api::config::Settings;
use status_api::{router, AppDeps};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn event(name: &str) -> String {
    let path = format!("{}/../../events/apigw-v2/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap()
}

fn callback(code: &str, state: &str, cookie: &str) -> lambda_http::Request {
    let mut v: serde_json::Value = serde_json::from_str(&event("get-callback.json")).unwrap();
    v["rawQueryString"] = format!("code={code}&state={state}").into();
    v["cookies"] = serde_json::json!([cookie]);
    v.as_object_mut().unwrap().remove("queryStringParameters");
    lambda_http::request::from_str(&v.to_string()).unwrap()
}

async fn status_and_body(app: &axum::Router, req: lambda_http::Request) -> (u16, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Connect and consent: (code, state, the browser-binding cookie pair).
async fn consent(app: &axum::Router) -> (String, String, String) {
    let resp = app
        .clone()
        .oneshot(lambda_http::request::from_str(&event("post-connect.json")).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let cookie = resp.headers()[http::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http
        .get(v["authorize_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    (q["code"].clone(), q["state"].clone(), cookie)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace,mapillary_sim=off"))
        .with_writer(capture.clone())
        .json()
        .init();
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0")
        .await
        .unwrap();
    let deps = Arc::new(AppDeps {
        repo: MemRepo::new(),
        tracking: MemTracking::default(),
        tokens: MemTokens::new(),
        states: MemStates::default(),
        objects: MemStore::new(),
        mapillary: MapillaryApp::new(
            MapillaryClient::new(
                Endpoints::under(sim.base_url()),
                reqwest::Client::new(),
                RetryPolicy::default(),
            ),
            defaults::APP_ID,
            SecretString::from(defaults::CLIENT_SECRET),
        ),
        settings: Settings {
            redirect_uri: Some(defaults::REDIRECT_URI.into()),
            ..Settings::default()
        },
    });
    let app = router(deps.clone());
    let (code, state, cookie) = consent(&app).await;
    let (status, body) = status_and_body(&app, callback(&code, &state, &cookie)).await;
    assert_eq!(status, 200, "{body}");
    // Failure paths log too: a bad code, a replayed state.
    let (_c, state2, cookie2) = consent(&app).await;
    assert_eq!(
        status_and_body(&app, callback("AQbogus", &state2, &cookie2))
            .await
            .0,
        400
    );
    assert_eq!(
        status_and_body(&app, callback(&code, &state, &cookie)).await.0,
        400
    );
    // …and a callback refused for the browser-binding cookie of another attempt.
    let (c3, state3, _) = consent(&app).await;
    assert_eq!(
        status_and_body(&app, callback(&c3, &state3, &cookie2)).await.0,
        403
    );
    let conn = lambda_http::request::from_str(&event("get-connection.json")).unwrap();
    let (status, body) = status_and_body(&app, conn).await;
    assert_eq!(status, 200);
    let token = deps.tokens.load("user-1").await.unwrap().unwrap();
    let token = token.access_token.expose_secret().to_string();
    assert!(!body.contains(&token));
    // The upload-token path: a token Mapillary refuses, then the demo user's.
    const REFUSED: &str = "MLYARrefused0upload0token0value00";
    for (t, want) in [(REFUSED, 400), (defaults::DEMO_USER_TOKEN, 200)] {
        let mut v: serde_json::Value = serde_json::from_str(&event("put-connection.json")).unwrap();
        v["body"] = serde_json::json!({ "upload_token": t }).to_string().into();
        let req = lambda_http::request::from_str(&v.to_string()).unwrap();
        let (status, body) = status_and_body(&app, req).await;
        assert_eq!(status, want, "{body}");
        assert!(!body.contains(t));
    }
    sim.shutdown().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("Mapillary account connected"),
        "the flow was logged:\n{logs}"
    );
    assert!(
        logs.contains("code exchange failed"),
        "the failure was logged:\n{logs}"
    );
    assert!(
        logs.contains("Mapillary upload token connected") && logs.contains("upload_token"),
        "the upload-token connection and its kind were logged:\n{logs}"
    );
    for (what, secret) in [
        ("access token", token.as_str()),
        ("client secret", defaults::CLIENT_SECRET),
        (
            "client secret hash part",
            defaults::CLIENT_SECRET.rsplit('|').next().unwrap(),
        ),
        ("refused upload token", REFUSED),
        ("upload token", defaults::DEMO_USER_TOKEN),
        ("authorization code", code.as_str()),
        ("state", state.as_str()),
        ("state 2", state2.as_str()),
        ("verifier cookie", cookie.as_str()),
        ("verifier cookie 2", cookie2.as_str()),
    ] {
        assert!(!logs.contains(secret), "{what} found in the logs");
    }
}

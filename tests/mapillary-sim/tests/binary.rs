//! The binary prints its base URL first and serves until SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test]
async fn binary_prints_base_url_and_serves() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mapillary-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--stage-seconds",
            "1,2,3,4",
            "--sequence-cap",
            "500",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        BufReader::new(stdout).read_line(&mut l).map(|_| l)
    })
    .await
    .unwrap()
    .unwrap();
    let base = line.trim().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    let cfg: serde_json::Value = reqwest::get(format!("{base}/_sim/config"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cfg["sequence_cap"], 500);
    assert_eq!(
        cfg["default_plan"]["stage_seconds"],
        serde_json::json!([1, 2, 3, 4])
    );
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

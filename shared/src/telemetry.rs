//! Structured logging for every function: JSON lines through `tracing`.
//!
//! Level from `AWS_LAMBDA_LOG_LEVEL`, then `RUST_LOG`, then INFO — the same precedence as the
//! runtime's own `init_default_subscriber`. Output is JSON unless `LOG_FORMAT=text` (handy locally).

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Safe to call more than once (later calls are no-ops).
pub fn init() {
    let level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(level.to_lowercase()).unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("LOG_FORMAT")
        .map(|v| v.eq_ignore_ascii_case("text"))
        .unwrap_or(false);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let _ = if text {
        builder.with_writer(std::io::stderr).try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    };
}

//! `mapillary-sim --listen 127.0.0.1:PORT [--world NAME] [--realtime] [--stage-seconds a,b,c,d] [--sequence-cap N]`
//!
//! Prints the base URL as the first stdout line, then serves until SIGTERM or SIGINT.

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use mapillary_sim::{ClockMode, SimConfig, Simulator, StorageMode, World, DEFAULT_WORLD};

#[derive(Parser, Debug)]
#[command(
    name = "mapillary-sim",
    about = "Offline Mapillary simulator (graph, rupload, OAuth, activity feed)"
)]
struct Args {
    /// Address to bind, e.g. 127.0.0.1:0 for an ephemeral port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// World to run in: lenient, seed-2022, oauth-upload-refused, partial-bytes-dropped, refresh-revokes,
    /// feed-drift or feed-gone (default: seed-2022).
    #[arg(long)]
    world: Option<String>,
    /// Run the clock in real time (the demo); default is frozen (moved by the admin API).
    #[arg(long)]
    realtime: bool,
    /// Stage durations in seconds: status,initial_processing,anonymization,tiler.
    #[arg(long, value_delimiter = ',')]
    stage_seconds: Option<Vec<u64>>,
    /// Server-side images-per-sequence cap (1000 or 500).
    #[arg(long)]
    sequence_cap: Option<usize>,
    /// Seed of the id generators.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep uploads in files under this directory instead of memory.
    #[arg(long)]
    storage_dir: Option<PathBuf>,
}

#[derive(thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Sim(#[from] mapillary_sim::SimError),
    #[error("--stage-seconds needs exactly 4 values")]
    StageSeconds,
    #[error("--world: {0}")]
    World(#[from] mapillary_sim::config::UnknownWorld),
    #[error("stdout: {0}")]
    Io(#[from] std::io::Error),
}

/// `main` returning `Err` prints the error with `Debug`: show the message, not the enum.
impl std::fmt::Debug for MainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[tokio::main]
async fn main() -> Result<(), MainError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let world: World = match args.world.as_deref() {
        Some(name) => name.parse()?,
        None => DEFAULT_WORLD,
    };
    let mut config = if args.realtime {
        SimConfig::realtime([3, 3, 3, 3])
    } else {
        SimConfig::frozen()
    };
    if args.realtime {
        config.clock = ClockMode::RealTime;
    }
    // The world sets only the world switches, so the stage durations above survive it.
    config = config.with_world(world);
    tracing::info!(world = world.name(), "world selected");
    if let Some(s) = args.stage_seconds {
        let arr: [u64; 4] = s.try_into().map_err(|_| MainError::StageSeconds)?;
        config.settings.default_plan.stage_seconds = arr;
    }
    if let Some(cap) = args.sequence_cap {
        config.settings.sequence_cap = cap;
    }
    config.seed = args.seed;
    if let Some(dir) = args.storage_dir {
        config.storage = StorageMode::Directory(dir);
    }
    let handle = Simulator::start(config, &args.listen).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", handle.base_url())?;
        out.flush()?;
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

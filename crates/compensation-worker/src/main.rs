//! compensation-worker binary: config -> telemetry -> app -> run(shutdown).

use std::time::Duration;

use compensation_worker::{App, Config};
use service_kit::auth::AuthConfig;
use service_kit::config::{listen_addr, SecretLoader};
use service_kit::{http, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_logging("compensation-worker");
    let config = Config::from_env()?;
    let addr = listen_addr("COMPENSATION_ADDR", "127.0.0.1:8083")?;
    let mut secrets = SecretLoader::from_env();
    let auth = AuthConfig::load_staff_only(&mut secrets)?;
    secrets.finish()?;
    let app = App::build(config, auth).await?;

    let stop = CancellationToken::new();
    // the engine, the sweep, the SLA monitor and the alerter
    let engine = tokio::spawn(app.clone().run(stop.clone()));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // on SIGTERM the engine gives back jobs not started and lets running ones finish for
    // JOB_DRAIN_TIMEOUT_MS; this bound only guards against a hang
    let drain = app.config.engine.drain_timeout + Duration::from_secs(5);
    http::serve_with_worker(listener, app.router(), ("job engine", engine), stop, drain).await
}

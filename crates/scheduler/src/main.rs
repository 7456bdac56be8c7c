//! scheduler binary: config -> telemetry -> app -> run(shutdown).

use std::time::Duration;

use scheduler::{App, Config};
use service_kit::auth::AuthConfig;
use service_kit::config::{listen_addr, SecretLoader};
use service_kit::{http, telemetry};
use tokio_util::sync::CancellationToken;

/// Development value of `NOTIFY_WEBHOOK_SECRET` (refused outside development).
const DEV_NOTIFY_SECRET: &str = "dev-notify-secret";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_logging("scheduler");
    let config = Config::from_env()?;
    let addr = listen_addr("SCHEDULER_ADDR", "127.0.0.1:8082")?;
    let mut secrets = SecretLoader::from_env();
    let auth = AuthConfig::load_staff_only(&mut secrets)?;
    let notify_secret = config
        .notify_url
        .as_ref()
        .map(|_| secrets.require("NOTIFY_WEBHOOK_SECRET", DEV_NOTIFY_SECRET));
    secrets.finish()?;
    let app = App::build(config, auth, notify_secret).await?;

    let stop = CancellationToken::new();
    let engine = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move { app.engine.run(stop).await })
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // on SIGTERM the engine gives back jobs not started and lets running ones finish for
    // JOB_DRAIN_TIMEOUT_MS; this bound only guards against a hang
    let drain = app.config.engine.drain_timeout + Duration::from_secs(5);
    http::serve_with_worker(listener, app.router(), ("job engine", engine), stop, drain).await
}

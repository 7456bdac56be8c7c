//! compensation-worker binary: config -> telemetry -> app -> run(shutdown).

use std::time::Duration;

use compensation_worker::{App, Config};
use service_kit::auth::AuthConfig;
use service_kit::config::{listen_addr, SecretLoader};
use service_kit::{http, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logging("compensation-worker");
    let config = Config::from_env()?;
    let addr = listen_addr("COMPENSATION_ADDR", "127.0.0.1:8083")?;
    let mut secrets = SecretLoader::from_env();
    let auth = AuthConfig::load_ops_only(&mut secrets);
    secrets.finish()?;
    let app = App::build(config, &auth.ops_token).await?;

    let stop = CancellationToken::new();
    let engine = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move { app.engine.run(stop).await })
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let shutdown = {
        let stop = stop.clone();
        async move {
            http::shutdown_signal().await;
            stop.cancel();
        }
    };
    http::serve(listener, app.router(), shutdown).await?;
    // the engine gives back what has not started and lets running checks finish
    stop.cancel();
    let bound = app.config.engine.drain_timeout + Duration::from_secs(5);
    match tokio::time::timeout(bound, engine).await {
        Ok(_) => tracing::info!("job engine drained"),
        Err(_) => tracing::warn!("job engine still busy at exit; its leases will be rescued"),
    }
    Ok(())
}

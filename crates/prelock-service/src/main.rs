//! prelock-service binary: config -> telemetry -> app -> run(shutdown).

use std::time::Duration;

use prelock_service::{App, Config};
use service_kit::config::{listen_addr, SecretLoader};
use service_kit::{auth::AuthConfig, http, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_logging("prelock-service");
    let config = Config::from_env()?;
    let addr = listen_addr("PRELOCK_ADDR", "127.0.0.1:8081")?;
    let mut secrets = SecretLoader::from_env();
    let auth = AuthConfig::load_staff_only(&mut secrets)?;
    secrets.finish()?;
    let app = App::build(config, auth).await?;
    let stop = CancellationToken::new();
    // the confirmer gives back pre-locks whose order never committed
    let confirmer = tokio::spawn(app.clone().run(stop.clone()));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    http::serve_with_worker(
        listener,
        app.router(),
        ("pre-lock confirmer", confirmer),
        stop,
        Duration::from_secs(5),
    )
    .await?;
    http::drain(&app.tasks, Duration::from_secs(10)).await;
    Ok(())
}

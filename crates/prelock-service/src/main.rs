//! prelock-service binary: config -> telemetry -> app -> run(shutdown).

use prelock_service::{App, Config};
use service_kit::config::{listen_addr, SecretLoader};
use service_kit::{auth::AuthConfig, http, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_logging("prelock-service");
    let config = Config::from_env()?;
    let addr = listen_addr("PRELOCK_ADDR", "127.0.0.1:8081")?;
    let mut secrets = SecretLoader::from_env();
    let auth = AuthConfig::load_ops_only(&mut secrets);
    secrets.finish()?;
    let app = App::build(config, auth).await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    http::serve(listener, app.router(), http::shutdown_signal()).await?;
    http::drain(&app.tasks, std::time::Duration::from_secs(10)).await;
    Ok(())
}

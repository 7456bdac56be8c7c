//! order-api binary: config -> telemetry -> app -> run(shutdown).

use gateway_protocol::ProviderSecrets;
use order_api::{App, Config};
use service_kit::config::{listen_addr, SecretLoader};
use service_kit::{auth::AuthConfig, http, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_logging("order-api");
    let config = Config::from_env()?;
    let addr = listen_addr("ORDER_API_ADDR", "127.0.0.1:8080")?;
    let mut secrets = SecretLoader::from_env();
    let auth = AuthConfig::load(&mut secrets)?;
    let providers = ProviderSecrets::load(|var, dev| secrets.require(var, dev));
    secrets.finish()?;
    let app = App::build(config, auth, providers).await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    http::serve(listener, app.router(), http::shutdown_signal()).await?;
    http::drain(&app.fulfillment.tasks, std::time::Duration::from_secs(10)).await;
    Ok(())
}

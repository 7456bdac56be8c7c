//! payment-gateway-sim binary: config -> telemetry -> app -> run(shutdown).

use gateway_protocol::ProviderSecrets;
use payment_gateway_sim::Sim;
use service_kit::config::{env_string, listen_addr, SecretLoader};
use service_kit::{http, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_logging("payment-gateway-sim");
    let addr = listen_addr("GATEWAY_SIM_ADDR", "127.0.0.1:8090")?;
    let public_url = env_string("GATEWAY_PUBLIC_URL", &format!("http://{addr}"));
    // the simulator signs "payment succeeded": public secrets would let anyone do the same
    let mut secrets = SecretLoader::from_env();
    let providers = ProviderSecrets::load(|var, dev| secrets.require(var, dev));
    secrets.finish()?;
    let sim = Sim::new(providers, &public_url)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    http::serve(listener, sim.router(), http::shutdown_signal()).await?;
    http::drain(&sim.tasks, std::time::Duration::from_secs(10)).await;
    Ok(())
}

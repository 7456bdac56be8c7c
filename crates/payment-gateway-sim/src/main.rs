//! payment-gateway-sim binary: config -> telemetry -> app -> run(shutdown).

use gateway_protocol::ProviderSecrets;
use payment_gateway_sim::Sim;
use service_kit::config::{env_string, listen_addr};
use service_kit::{http, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logging("payment-gateway-sim");
    let addr = listen_addr("GATEWAY_SIM_ADDR", "127.0.0.1:8090")?;
    let public_url = env_string("GATEWAY_PUBLIC_URL", &format!("http://{addr}"));
    let sim = Sim::new(ProviderSecrets::from_env(), &public_url)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    http::serve(listener, sim.router(), http::shutdown_signal()).await?;
    http::drain(&sim.tasks, std::time::Duration::from_secs(10)).await;
    Ok(())
}

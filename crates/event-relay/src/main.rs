//! event-relay binary: config -> telemetry -> app -> run(shutdown).

use std::time::Duration;

use event_relay::{App, Config};
use service_kit::config::listen_addr;
use service_kit::{http, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_logging("event-relay");
    let config = Config::from_env()?;
    let addr = listen_addr("EVENT_RELAY_ADDR", "127.0.0.1:8084")?;
    let app = App::build(config).await?;
    let stop = CancellationToken::new();
    let work = tokio::spawn(app.clone().run(stop.clone()));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // on SIGTERM the relay finishes the batch in flight (marking what Kafka acknowledged) and
    // the consumer commits what it applied
    http::serve_with_worker(
        listener,
        app.router(),
        ("relay and consumer", work),
        stop,
        Duration::from_secs(15),
    )
    .await
}

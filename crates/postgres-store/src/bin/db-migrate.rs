//! `db-migrate`: applies `migrations/` as the migrating role and grants the application role
//! its DML, then exits. The services then run as that application role with
//! `RUN_MIGRATIONS=false`: they can read and write rows, never change the schema.
//!
//! - `MIGRATION_DATABASE_URL` (else `DATABASE_URL`): the migrating role, which owns the
//!   tables.
//! - `APP_DB_ROLE` (default `bar_app`): the role the services connect as; `-` skips the
//!   grants.

use postgres_store::PgStore;
use service_kit::config::{env_string, redact_url};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let _telemetry = service_kit::telemetry::init_logging("db-migrate");
    let url = match std::env::var("MIGRATION_DATABASE_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => env_string(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/bar_fulfillment",
        ),
    };
    let role = env_string("APP_DB_ROLE", "bar_app");
    let limits = postgres_store::PgLimits::from_env(2, service_kit::config::env_or)?;
    let store = PgStore::connect_patiently(&url, &limits).await?;
    store.migrate().await?;
    tracing::info!(database = %redact_url(&url), "migrations applied");
    if role != "-" {
        store.grant_application_role(&role).await?;
        tracing::info!(%role, "application role granted DML only");
    }
    Ok(())
}

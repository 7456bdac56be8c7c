//! Configuration from environment variables, each with a local default that works on a
//! developer machine. Parsing errors name the variable.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context};

/// `name` parsed as `T`, or `default` when unset or empty.
pub fn env_or<T: FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| anyhow!("{name}={v:?} is invalid: {e}")),
        _ => Ok(default),
    }
}

pub fn env_string(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => default.to_owned(),
    }
}

/// A duration given in milliseconds.
pub fn env_millis(name: &str, default_ms: u64) -> anyhow::Result<Duration> {
    env_or(name, default_ms).map(Duration::from_millis)
}

/// A secret: warns (once, without the value) when the development default is in use.
pub fn env_secret(name: &str, dev_default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => {
            tracing::warn!(variable = name, "using the development default secret");
            dev_default.to_owned()
        }
    }
}

/// The address a service listens on, e.g. `ORDER_API_ADDR=0.0.0.0:8080`.
pub fn listen_addr(name: &str, default: &str) -> anyhow::Result<std::net::SocketAddr> {
    env_string(name, default)
        .parse()
        .with_context(|| format!("parse {name}"))
}

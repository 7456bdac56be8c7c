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

/// The explicit development setting: with `ALLOW_DEV_SECRETS=true`, secrets that are unset or
/// at their public development defaults are accepted (with a warning). `scripts/dev-up.sh` and
/// the tests set it; nothing else should.
pub const ALLOW_DEV_SECRETS: &str = "ALLOW_DEV_SECRETS";

/// Reads secrets, refusing public development values outside development.
///
/// Every problem is collected, so one failed start names every variable to set:
/// ```text
/// let mut secrets = SecretLoader::from_env();
/// let auth = AuthConfig::load(&mut secrets)?;
/// secrets.finish()?;
/// ```
pub struct SecretLoader {
    lookup: Box<dyn Fn(&str) -> Option<String>>,
    allow_dev: bool,
    problems: Vec<String>,
}

impl SecretLoader {
    pub fn from_env() -> Self {
        let allow_dev = std::env::var(ALLOW_DEV_SECRETS)
            .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
        Self::new(move |name| std::env::var(name).ok(), allow_dev)
    }

    pub fn new(lookup: impl Fn(&str) -> Option<String> + 'static, allow_dev: bool) -> Self {
        SecretLoader {
            lookup: Box::new(lookup),
            allow_dev,
            problems: Vec::new(),
        }
    }

    /// The secret in `name`. Unset, empty, or equal to `dev_default`: an error at
    /// [`finish`](Self::finish), unless development secrets are allowed (then the default).
    pub fn require(&mut self, name: &str, dev_default: &str) -> String {
        let value = (self.lookup)(name).filter(|v| !v.is_empty());
        let problem = match &value {
            None => "is unset",
            Some(v) if v == dev_default => "is set to its public development default",
            Some(v) => return v.clone(),
        };
        if self.allow_dev {
            tracing::warn!(
                variable = name,
                "{ALLOW_DEV_SECRETS}: using a development secret"
            );
            return value.unwrap_or_else(|| dev_default.to_owned());
        }
        self.problems.push(format!("{name} {problem}"));
        String::new()
    }

    /// Fails naming every secret that is missing or public.
    pub fn finish(self) -> anyhow::Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        Err(anyhow!(
            "refusing to start: {}. Set them (never to the documented development values), or \
             set {ALLOW_DEV_SECRETS}=true on a development machine",
            self.problems.join(", ")
        ))
    }
}

/// The address a service listens on, e.g. `ORDER_API_ADDR=0.0.0.0:8080`.
pub fn listen_addr(name: &str, default: &str) -> anyhow::Result<std::net::SocketAddr> {
    env_string(name, default)
        .parse()
        .with_context(|| format!("parse {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loader(vars: &[(&str, &str)], allow_dev: bool) -> SecretLoader {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SecretLoader::new(move |n| vars.get(n).cloned(), allow_dev)
    }

    #[test]
    fn secrets_refuse_unset_and_development_values_naming_each_variable() {
        let mut l = loader(&[("B", "dev-b"), ("C", "real")], false);
        l.require("A", "dev-a");
        l.require("B", "dev-b");
        assert_eq!(l.require("C", "dev-c"), "real");
        let err = l.finish().unwrap_err().to_string();
        assert!(err.contains("A is unset"), "{err}");
        assert!(
            err.contains("B is set to its public development default"),
            "{err}"
        );
        assert!(!err.contains("C "), "{err}");

        let mut l = loader(&[("E", "")], false);
        l.require("E", "dev-e");
        assert!(l.finish().unwrap_err().to_string().contains("E is unset"));

        let mut dev = loader(&[("B", "dev-b")], true);
        assert_eq!(dev.require("A", "dev-a"), "dev-a");
        assert_eq!(dev.require("B", "dev-b"), "dev-b");
        dev.finish().unwrap();
    }
}

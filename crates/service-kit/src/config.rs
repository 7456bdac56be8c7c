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
    /// Secrets read so far (name, value): two roles must never share one.
    seen: Vec<(String, String)>,
}

/// The shortest secret accepted outside development: an HMAC-SHA256 key should carry at
/// least the hash's 256 bits (RFC 2104 §3); shorter ones can be guessed offline from one
/// signed token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The fewest distinct non-blank characters a secret may have outside development: a random
/// 32-byte secret (hex, base64) has well over this; `aaaa...` or 32 spaces has one.
pub const MIN_SECRET_DISTINCT: usize = 8;

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
            seen: Vec::new(),
        }
    }

    /// The secret in `name`. Unset, empty, equal to `dev_default`, shorter than
    /// [`MIN_SECRET_BYTES`], or the same as another secret read before: an error at
    /// [`finish`](Self::finish), unless development secrets are allowed (then a warning, and
    /// the default for an unset one).
    pub fn require(&mut self, name: &str, dev_default: &str) -> String {
        let value = (self.lookup)(name).filter(|v| !v.is_empty());
        let problem = match &value {
            None => "is unset".to_owned(),
            Some(v) if v == dev_default => "is set to its public development default".to_owned(),
            Some(v) => {
                let mut problems = Vec::new();
                if v.len() < MIN_SECRET_BYTES {
                    problems.push(format!("{name} is shorter than {MIN_SECRET_BYTES} bytes"));
                }
                let distinct = v
                    .bytes()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                if distinct < MIN_SECRET_DISTINCT {
                    problems.push(format!(
                        "{name} has fewer than {MIN_SECRET_DISTINCT} distinct characters \
                         (a repeated or blank value, not a random one)"
                    ));
                }
                if let Some((other, _)) = self.seen.iter().find(|(_, s)| s == v) {
                    problems.push(format!("{name} is the same secret as {other}"));
                }
                self.seen.push((name.to_owned(), v.clone()));
                if problems.is_empty() || self.allow_dev {
                    for p in &problems {
                        tracing::warn!(variable = name, "{ALLOW_DEV_SECRETS}: {p}");
                    }
                    return v.clone();
                }
                self.problems.extend(problems);
                return String::new();
            }
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

/// A URL fit for a log line or an error: scheme and host (and port) only. Credentials
/// (`user:password@`), paths and query strings are dropped, since that is where webhook and
/// connection secrets live (WeCom's `?key=`, DingTalk's `?access_token=`, Slack's path,
/// `redis://:password@host`).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match scheme {
        Some(s) => format!("{s}://{host}"),
        None => host.to_owned(),
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
        let real = "a-real-secret-of-at-least-32-bytes";
        let mut l = loader(&[("B", "dev-b"), ("C", real)], false);
        l.require("A", "dev-a");
        l.require("B", "dev-b");
        assert_eq!(l.require("C", "dev-c"), real);
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

    #[test]
    fn urls_are_redacted_to_scheme_and_host() {
        for (url, want) in [
            (
                "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=SECRET",
                "https://qyapi.weixin.qq.com",
            ),
            (
                "https://oapi.dingtalk.com/robot/send?access_token=SECRET",
                "https://oapi.dingtalk.com",
            ),
            (
                "https://hooks.slack.com/services/T0/B0/SECRET",
                "https://hooks.slack.com",
            ),
            ("redis://:SECRET@127.0.0.1:6379/0", "redis://127.0.0.1:6379"),
            ("postgres://app:SECRET@db:5432/bar", "postgres://db:5432"),
            ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
            ("user:SECRET@host/x", "host"),
        ] {
            assert_eq!(redact_url(url), want);
            assert!(!redact_url(url).contains("SECRET"));
        }
    }

    #[test]
    fn secrets_must_be_long_and_distinct_outside_development() {
        let long = "k".repeat(MIN_SECRET_BYTES);
        let mut l = loader(
            &[
                ("S1", "a"),
                ("K1", &long),
                ("K2", &long),
                ("OK", "3f9c1a7e5b2d8c4a6e0f1b3d5a7c9e2f4b6d8a0c"),
                ("BLANK", &" ".repeat(40)),
                ("SAME", &"z".repeat(40)),
            ],
            false,
        );
        l.require("S1", "dev-s1");
        l.require("K1", "dev-k1");
        l.require("K2", "dev-k2");
        assert_eq!(
            l.require("OK", "dev-ok"),
            "3f9c1a7e5b2d8c4a6e0f1b3d5a7c9e2f4b6d8a0c"
        );
        l.require("BLANK", "dev-blank");
        l.require("SAME", "dev-same");
        let err = l.finish().unwrap_err().to_string();
        assert!(err.contains("S1 is shorter than 32 bytes"), "{err}");
        assert!(err.contains("K2 is the same secret as K1"), "{err}");
        assert!(err.contains("BLANK has fewer than 8 distinct"), "{err}");
        assert!(err.contains("SAME has fewer than 8 distinct"), "{err}");
        assert!(!err.contains("OK"), "{err}");
        // in development they are only warned about
        let mut dev = loader(&[("S1", "a"), ("K1", "a")], true);
        assert_eq!(dev.require("S1", "dev-s1"), "a");
        assert_eq!(dev.require("K1", "dev-k1"), "a");
        dev.finish().unwrap();
    }
}

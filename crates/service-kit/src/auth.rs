//! Authentication.
//!
//! - Buyers: `Authorization: Bearer <JWT>`, HS256 only, `sub` = user id, `exp` honoured when
//!   present. Implemented directly on `hmac` + `sha2` (a few lines) rather than pulling a JWT
//!   crate and its crypto backend into every build; the algorithm is pinned, so `alg: none`
//!   and RS/HS confusion are refused by construction.
//! - Operators (and service-to-service calls): `Authorization: Bearer <OPS_TOKEN>`, compared in
//!   constant time.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{ApiError, ErrorCode};

/// Development defaults, documented in README.md; production must set both variables.
pub const DEV_JWT_SECRET: &str = "dev-jwt-secret-change-me";
pub const DEV_OPS_TOKEN: &str = "dev-ops-token";

/// Secrets the auth extractors need; an app state exposes it through `FromRef`.
#[derive(Clone)]
pub struct AuthConfig {
    pub jwt_secret: String,
    pub ops_token: String,
}

impl AuthConfig {
    pub fn from_env() -> Self {
        AuthConfig {
            jwt_secret: crate::config::env_secret("AUTH_JWT_SECRET", DEV_JWT_SECRET),
            ops_token: crate::config::env_secret("OPS_TOKEN", DEV_OPS_TOKEN),
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthConfig { <redacted> }")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unsupported algorithm (only HS256)")]
    Algorithm,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token has no usable sub")]
    Subject,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length")
}

/// Mints an HS256 token for `sub`, valid for `ttl_secs`. For tests, the load generator and
/// local development; production tokens come from the platform's identity service.
pub fn mint_token(secret: &str, sub: &str, ttl_secs: i64) -> String {
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let exp = chrono::Utc::now().timestamp() + ttl_secs;
    let claims = B64.encode(serde_json::json!({ "sub": sub, "exp": exp }).to_string());
    let signing_input = format!("{header}.{claims}");
    let mut m = mac(secret);
    m.update(signing_input.as_bytes());
    let sig = B64.encode(m.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Verifies an HS256 token and returns its `sub`.
pub fn verify_token(secret: &str, token: &str, now_secs: i64) -> Result<String, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header: serde_json::Value = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(TokenError::Algorithm);
    }
    let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
    let mut m = mac(secret);
    m.update(h.as_bytes());
    m.update(b".");
    m.update(c.as_bytes());
    m.verify_slice(&sig).map_err(|_| TokenError::Signature)?;
    let claims: serde_json::Value = B64
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed)?;
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_i64().ok_or(TokenError::Malformed)?;
        if exp <= now_secs {
            return Err(TokenError::Expired);
        }
    }
    match claims.get("sub").and_then(|s| s.as_str()) {
        Some(sub) if !sub.is_empty() => Ok(sub.to_owned()),
        _ => Err(TokenError::Subject),
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing bearer token"))
}

/// Constant-time comparison for shared secrets.
pub fn secret_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An authenticated buyer: the `sub` of a valid token.
#[derive(Debug, Clone)]
pub struct AuthUser(pub String);

impl<S> FromRequestParts<S> for AuthUser
where
    AuthConfig: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let cfg = AuthConfig::from_ref(state);
        let token = bearer(parts)?;
        verify_token(&cfg.jwt_secret, token, chrono::Utc::now().timestamp())
            .map(AuthUser)
            .map_err(|e| ApiError::new(ErrorCode::Unauthorized, e.to_string()))
    }
}

/// An operator (or a trusted service) holding `OPS_TOKEN`.
#[derive(Debug, Clone, Copy)]
pub struct Ops;

impl<S> FromRequestParts<S> for Ops
where
    AuthConfig: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let cfg = AuthConfig::from_ref(state);
        if secret_eq(bearer(parts)?, &cfg.ops_token) {
            Ok(Ops)
        } else {
            Err(ApiError::new(ErrorCode::Unauthorized, "invalid ops token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_tampering_is_refused() {
        let now = chrono::Utc::now().timestamp();
        let t = mint_token("s3cret", "user-1", 60);
        assert_eq!(verify_token("s3cret", &t, now).unwrap(), "user-1");
        assert_eq!(verify_token("other", &t, now), Err(TokenError::Signature));
        assert_eq!(
            verify_token("s3cret", &t, now + 61),
            Err(TokenError::Expired)
        );
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(br#"{"sub":"admin"}"#);
        parts[1] = &forged;
        assert_eq!(
            verify_token("s3cret", &parts.join("."), now),
            Err(TokenError::Signature)
        );
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none"}"#),
            B64.encode(br#"{"sub":"x"}"#)
        );
        assert_eq!(
            verify_token("s3cret", &none, now),
            Err(TokenError::Algorithm)
        );
        assert_eq!(
            verify_token("s3cret", "a.b", now),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn secret_eq_compares_whole_strings() {
        assert!(secret_eq("abc", "abc"));
        assert!(!secret_eq("abc", "abd"));
        assert!(!secret_eq("abc", "ab"));
    }
}

//! JWT authentication of WebSocket handshakes (HS256), by hand on `hmac` + `sha2`.
//!
//! With a secret configured ([`ServerConfig::jwt_secret`](super::ServerConfig::jwt_secret)),
//! a handshake may carry a token in, by order of precedence:
//!
//! 1. the `Sec-WebSocket-Protocol` pair `bearer, <token>` (what a browser can send; the server
//!    then selects `bearer`, so the browser accepts the handshake);
//! 2. the `token` query parameter (redacted in the access log);
//! 3. the `token` cookie.
//!
//! The token must be a JWT signed with HS256 and the secret, with an `exp` claim in the
//! future (30 s leeway), an `nbf` claim in the past if it has one, and a non-empty string
//! `sub`, which becomes [`Scope::user`](crate::Scope::user). A token that is present but not
//! valid gets 403 before the upgrade; so does a handshake without a token on a route that
//! requires a user ([`login_required`](crate::login_required), or
//! [`ServerConfig::require_user`](super::ServerConfig::require_user) for every route).

use std::borrow::Cow;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Seconds of clock skew allowed on `exp` and `nbf`.
const LEEWAY: u64 = 30;

/// The HS256 secret. Its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSecret(Vec<u8>);

impl JwtSecret {
    /// A secret from its bytes (the text of `CANAL_JWT_SECRET`, say).
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        JwtSecret(secret.into())
    }
}

impl std::fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtSecret(<redacted>)")
    }
}

/// Why a handshake was not authenticated (403 before the upgrade).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The route requires a user and the handshake carries no token.
    #[error("authentication required")]
    Missing,
    /// The token is not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// The token is signed with another algorithm than HS256 (`none` included).
    #[error("token algorithm {0:?} is not accepted (HS256 only)")]
    Algorithm(String),
    /// The signature does not match the secret.
    #[error("bad token signature")]
    Signature,
    /// The token has no numeric `exp`, or it is past.
    #[error("token expired or without exp")]
    Expired,
    /// The token's `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// The token has no non-empty string `sub`.
    #[error("token without a subject")]
    NoSubject,
}

fn b64(part: &str) -> Result<Vec<u8>, AuthError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)
}

/// Verifies an HS256 JWT at unix time `now` and returns its subject.
pub fn verify_hs256(token: &str, secret: &JwtSecret, now: u64) -> Result<String, AuthError> {
    let mut parts = token.split('.');
    let (Some(head), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let header: serde_json::Value =
        serde_json::from_slice(&b64(head)?).map_err(|_| AuthError::Malformed)?;
    match header.get("alg").and_then(|a| a.as_str()) {
        Some("HS256") => {}
        Some(other) => return Err(AuthError::Algorithm(other.to_owned())),
        None => return Err(AuthError::Malformed),
    }
    let signature = b64(sig)?;
    let mut mac = HmacSha256::new_from_slice(&secret.0).map_err(|_| AuthError::Signature)?;
    mac.update(head.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::Signature)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&b64(body)?).map_err(|_| AuthError::Malformed)?;
    let exp = claims
        .get("exp")
        .and_then(serde_json::Value::as_f64)
        .ok_or(AuthError::Expired)?;
    if exp + LEEWAY as f64 <= now as f64 {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_f64().ok_or(AuthError::Malformed)?;
        if nbf > (now + LEEWAY) as f64 {
            return Err(AuthError::NotYetValid);
        }
    }
    match claims.get("sub").and_then(|s| s.as_str()) {
        Some(sub) if !sub.is_empty() => Ok(sub.to_owned()),
        _ => Err(AuthError::NoSubject),
    }
}

/// Signs `claims` (a JSON object) with HS256: for tests and tools that mint tokens.
pub fn sign_hs256(claims: &serde_json::Value, secret: &JwtSecret) -> String {
    let enc = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let head = enc(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = enc(claims.to_string().as_bytes());
    let signature = match HmacSha256::new_from_slice(&secret.0) {
        Ok(mut mac) => {
            mac.update(head.as_bytes());
            mac.update(b".");
            mac.update(body.as_bytes());
            enc(&mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this branch cannot be taken.
        Err(_) => String::new(),
    };
    format!("{head}.{body}.{signature}")
}

/// Where a handshake's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenSource {
    /// `Sec-WebSocket-Protocol: bearer, <token>`: the answer must select `bearer`.
    Protocol,
    Query,
    Cookie,
}

/// Finds a token in a handshake (see the module documentation for the order).
pub(crate) fn find_token(
    headers: &hyper::HeaderMap,
    query: Option<&str>,
) -> Option<(String, TokenSource)> {
    let offered: Vec<&str> = headers
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if let Some(at) = offered
        .iter()
        .position(|p| p.eq_ignore_ascii_case("bearer"))
        && let Some(token) = offered.get(at + 1)
    {
        return Some(((*token).to_owned(), TokenSource::Protocol));
    }
    if let Some(query) = query {
        for pair in query.split('&') {
            if let Some(value) = pair.strip_prefix("token=") {
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned();
                return Some((value, TokenSource::Query));
            }
        }
    }
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("token="))
        .map(|t| (t.to_owned(), TokenSource::Cookie))
}

/// A path with its query string for the access log, `token` values redacted.
pub(crate) fn logged_target<'a>(path: &'a str, query: Option<&str>) -> Cow<'a, str> {
    match query {
        Some(q) if !q.is_empty() => Cow::Owned(format!("{path}?{}", redact_query(q))),
        _ => Cow::Borrowed(path),
    }
}

/// The query string with the value of every `token` parameter replaced, for logs.
pub(crate) fn redact_query(query: &str) -> Cow<'_, str> {
    if !query.split('&').any(|p| p.starts_with("token=")) {
        return Cow::Borrowed(query);
    }
    Cow::Owned(
        query
            .split('&')
            .map(|p| {
                if p.starts_with("token=") {
                    "token=[redacted]"
                } else {
                    p
                }
            })
            .collect::<Vec<_>>()
            .join("&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn round_trip_and_every_refusal() {
        let secret = JwtSecret::new("s3cret");
        let good = sign_hs256(&json!({"sub": "alice", "exp": NOW + 60}), &secret);
        assert_eq!(verify_hs256(&good, &secret, NOW), Ok("alice".to_owned()));
        let other = JwtSecret::new("other");
        assert_eq!(verify_hs256(&good, &other, NOW), Err(AuthError::Signature));
        let expired = sign_hs256(&json!({"sub": "a", "exp": NOW - 3600}), &secret);
        assert_eq!(
            verify_hs256(&expired, &secret, NOW),
            Err(AuthError::Expired)
        );
        let no_exp = sign_hs256(&json!({"sub": "a"}), &secret);
        assert_eq!(verify_hs256(&no_exp, &secret, NOW), Err(AuthError::Expired));
        let early = sign_hs256(
            &json!({"sub": "a", "exp": NOW + 9999, "nbf": NOW + 999}),
            &secret,
        );
        assert_eq!(
            verify_hs256(&early, &secret, NOW),
            Err(AuthError::NotYetValid)
        );
        let no_sub = sign_hs256(&json!({"exp": NOW + 60}), &secret);
        assert_eq!(
            verify_hs256(&no_sub, &secret, NOW),
            Err(AuthError::NoSubject)
        );
        // alg=none with the signature stripped.
        let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let none = format!(
            "{}.{}.",
            enc(br#"{"alg":"none"}"#),
            enc(br#"{"sub":"admin","exp":9999999999}"#)
        );
        assert_eq!(
            verify_hs256(&none, &secret, NOW),
            Err(AuthError::Algorithm("none".to_owned()))
        );
        // A tampered payload under the original signature.
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = enc(br#"{"sub":"admin","exp":9999999999}"#);
        parts[1] = &forged;
        assert_eq!(
            verify_hs256(&parts.join("."), &secret, NOW),
            Err(AuthError::Signature)
        );
        for bad in ["", "a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.e30"] {
            assert!(verify_hs256(bad, &secret, NOW).is_err(), "{bad}");
        }
        assert_eq!(format!("{secret:?}"), "JwtSecret(<redacted>)");
    }

    #[test]
    fn tokens_are_found_and_redacted() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            hyper::header::HeaderValue::from_static("chat, bearer, abc.def.ghi"),
        );
        assert_eq!(
            find_token(&h, Some("token=q")),
            Some(("abc.def.ghi".to_owned(), TokenSource::Protocol))
        );
        let mut h = hyper::HeaderMap::new();
        h.insert(
            hyper::header::COOKIE,
            hyper::header::HeaderValue::from_static("theme=dark; token=c.o.k"),
        );
        assert_eq!(
            find_token(&h, Some("x=1&token=q%2Eq")),
            Some(("q.q".to_owned(), TokenSource::Query))
        );
        assert_eq!(
            find_token(&h, None),
            Some(("c.o.k".to_owned(), TokenSource::Cookie))
        );
        assert_eq!(find_token(&hyper::HeaderMap::new(), Some("x=1")), None);
        assert_eq!(
            redact_query("a=1&token=xyz&b=2"),
            "a=1&token=[redacted]&b=2"
        );
        assert_eq!(redact_query("a=1"), "a=1");
    }
}

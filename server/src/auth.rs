//! Who a client is and what it may do.
//!
//! Clients present an HS256 JWT (`?token=` or `Authorization: Bearer`) with claims `sub`, `exp`,
//! optional `subs` (channel globs it may subscribe to; absent = all but other users' personal
//! channels) and optional `pubs` (globs it may publish to from its socket; absent = none).
//! Without a secret the node is in dev mode: clients are who `?user=` says, and may do anything
//! but join other users' personal channels. Backends and operators use plain keys instead.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;

use crate::channel::{ChannelName, ChannelPattern};
use crate::protocol::{CloseCode, CommandError, ErrorCode};

/// Why a client was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: pass ?token=<jwt> or an Authorization: Bearer header")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired: fetch a new token and reconnect")]
    Expired,
    #[error("not allowed to {action} channel {channel}")]
    Forbidden { action: &'static str, channel: ChannelName },
    #[error("banned by an operator until {until_ms} (Unix ms)")]
    Banned { until_ms: u64 },
}

impl AuthError {
    /// The WebSocket close code for a connection refused with this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => CloseCode::Unauthorized,
            AuthError::Expired => CloseCode::TokenExpired,
            AuthError::Forbidden { .. } | AuthError::Banned { .. } => CloseCode::Forbidden,
        }
    }

    /// The reply error for a command refused with this error.
    pub fn command_error(&self) -> CommandError {
        let code = match self {
            AuthError::Missing | AuthError::Invalid(_) => ErrorCode::Unauthorized,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Forbidden { .. } | AuthError::Banned { .. } => ErrorCode::Forbidden,
        };
        CommandError::new(code, self.to_string())
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    subs: Option<Vec<String>>,
    pubs: Option<Vec<String>>,
}

/// An authenticated client: its user id and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    /// Globs the client may subscribe to; `None` = every channel.
    subs: Option<Vec<ChannelPattern>>,
    /// Globs the client may publish to; empty = none.
    pubs: Vec<ChannelPattern>,
    /// Unix seconds when the token expires; `None` in dev mode.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Personal channels belong to their user alone; then the token's `subs` decide.
    pub fn can_subscribe(&self, channel: &ChannelName) -> Result<(), AuthError> {
        let own = channel.personal_owner().is_none_or(|owner| owner == self.user);
        let listed = self.subs.as_ref().is_none_or(|subs| subs.iter().any(|p| p.matches(channel.as_str())));
        if own && listed { Ok(()) } else { Err(forbidden("subscribe to", channel)) }
    }

    /// Resolves when the token expires (the session then closes with 4011); never in dev mode.
    pub fn expired(&self) -> impl Future<Output = ()> + Send + 'static {
        let expires_at = self.expires_at;
        async move {
            match expires_at {
                Some(at) => {
                    let now = crate::engine::now_ms() / 1000;
                    tokio::time::sleep(std::time::Duration::from_secs(at.saturating_sub(now))).await
                }
                None => std::future::pending().await,
            }
        }
    }

    /// Publishing from a socket needs a matching `pubs` glob.
    pub fn can_publish(&self, channel: &ChannelName) -> Result<(), AuthError> {
        if self.pubs.iter().any(|p| p.matches(channel.as_str())) {
            Ok(())
        } else {
            Err(forbidden("publish to", channel))
        }
    }
}

fn forbidden(action: &'static str, channel: &ChannelName) -> AuthError {
    AuthError::Forbidden { action, channel: channel.clone() }
}

/// Turns what a client presented into an `Identity`.
pub struct Authenticator {
    key: Option<(DecodingKey, Validation)>,
}

impl Authenticator {
    /// `secret = None` is dev mode.
    pub fn new(secret: Option<&str>) -> Self {
        let key = secret.map(|s| {
            let mut v = Validation::new(Algorithm::HS256);
            // No leeway: a token is refused exactly when the open session would be closed (4011).
            v.leeway = 0;
            v.validate_nbf = true;
            // pushd names no audience; tokens from identity providers often carry one.
            v.validate_aud = false;
            v.set_required_spec_claims(&["exp", "sub"]);
            (DecodingKey::from_secret(s.as_bytes()), v)
        });
        Self { key }
    }

    /// Checks a token (or, in dev mode, takes `dev_user` at its word).
    pub fn authenticate(&self, token: Option<&str>, dev_user: Option<&str>) -> Result<Identity, AuthError> {
        let Some((key, validation)) = &self.key else {
            let user = dev_user.filter(|u| !u.is_empty()).unwrap_or("anonymous");
            let everything = ChannelPattern::parse("*").expect("`*` is a pattern");
            return Ok(Identity { user: user.to_owned(), subs: None, pubs: vec![everything], expires_at: None });
        };
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let claims = decode::<Claims>(token, key, validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?
            .claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty sub claim".into()));
        }
        let patterns = |list: Vec<String>, claim: &str| {
            list.iter()
                .map(|p| {
                    ChannelPattern::parse(p).map_err(|e| AuthError::Invalid(format!("{claim} pattern {p:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Identity {
            user: claims.sub,
            subs: claims.subs.map(|s| patterns(s, "subs")).transpose()?,
            pubs: patterns(claims.pubs.unwrap_or_default(), "pubs")?,
            expires_at: Some(claims.exp),
        })
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn keys_match(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "test-secret-0123456789";

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn exp(offset: i64) -> i64 {
        (crate::engine::now_ms() / 1000) as i64 + offset
    }

    fn ch(s: &str) -> ChannelName {
        ChannelName::parse(s).unwrap()
    }

    #[test]
    fn valid_tokens_carry_their_permissions() {
        let auth = Authenticator::new(Some(SECRET));
        let t = token(json!({"sub":"alice","exp":exp(60),"subs":["room:*"],"pubs":["room:1"]}), SECRET);
        let id = auth.authenticate(Some(&t), None).unwrap();
        assert_eq!(id.user, "alice");
        assert!(id.can_subscribe(&ch("room:2")).is_ok());
        assert!(id.can_subscribe(&ch("news")).is_err());
        assert!(id.can_publish(&ch("room:1")).is_ok());
        assert!(id.can_publish(&ch("room:2")).is_err());
    }

    #[test]
    fn personal_channels_are_their_owners_alone() {
        let auth = Authenticator::new(Some(SECRET));
        let t = token(json!({"sub":"alice","exp":exp(60)}), SECRET);
        let id = auth.authenticate(Some(&t), None).unwrap();
        assert!(id.can_subscribe(&ch("user:alice")).is_ok());
        assert!(id.can_subscribe(&ch("user:bob")).is_err());
        assert!(id.can_subscribe(&ch("anything")).is_ok());
        assert!(id.can_publish(&ch("anything")).is_err(), "no pubs claim = no publishing");
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let auth = Authenticator::new(Some(SECRET));
        assert_eq!(auth.authenticate(None, None).unwrap_err(), AuthError::Missing);
        let expired = token(json!({"sub":"a","exp":exp(-60)}), SECRET);
        assert_eq!(auth.authenticate(Some(&expired), None).unwrap_err(), AuthError::Expired);
        let forged = token(json!({"sub":"a","exp":exp(60)}), "another-secret-0123456");
        assert!(matches!(auth.authenticate(Some(&forged), None), Err(AuthError::Invalid(_))));
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(matches!(auth.authenticate(Some(none), None), Err(AuthError::Invalid(_))));
        let no_sub = token(json!({"exp":exp(60)}), SECRET);
        assert!(matches!(auth.authenticate(Some(&no_sub), None), Err(AuthError::Invalid(_))));
        let bad_glob = token(json!({"sub":"a","exp":exp(60),"subs":["{x}"]}), SECRET);
        assert!(matches!(auth.authenticate(Some(&bad_glob), None), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn dev_mode_takes_the_user_at_its_word() {
        let id = Authenticator::new(None).authenticate(None, Some("bob")).unwrap();
        assert_eq!(id.user, "bob");
        assert!(id.can_publish(&ch("x")).is_ok());
        assert!(id.can_subscribe(&ch("user:alice")).is_err());
    }

    #[test]
    fn keys_compare_exactly() {
        assert!(keys_match(b"abc", b"abc"));
        assert!(!keys_match(b"abd", b"abc"));
        assert!(!keys_match(b"ab", b"abc"));
    }
}

//! Channel names and channel patterns.
//!
//! A `ChannelName` is checked when it is built, so no unchecked name ever reaches history keys,
//! metrics or logs: 1–128 bytes of `[A-Za-z0-9_.:@/=-]`. Glob characters, braces (Redis hash
//! tags), whitespace and control characters are refused. `user:<id>` is a personal channel.

use std::fmt;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// A validated channel name; cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

/// Why a channel name was refused; the text goes to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadChannel {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel name has a forbidden character {0:?}: use letters, digits and _ . : @ / = -")]
    BadChar(char),
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '/' | '=' | '-')
}

/// What names and patterns share: 1 to `MAX_CHANNEL_LEN` bytes of the channel alphabet, plus `*`
/// in a pattern.
fn check(text: &str, star: bool) -> Result<(), BadChannel> {
    if text.is_empty() {
        return Err(BadChannel::Empty);
    }
    if text.len() > MAX_CHANNEL_LEN {
        return Err(BadChannel::TooLong);
    }
    match text.chars().find(|&c| !(allowed(c) || star && c == '*')) {
        Some(c) => Err(BadChannel::BadChar(c)),
        None => Ok(()),
    }
}

impl ChannelName {
    /// Checks `name` against the channel syntax.
    pub fn parse(name: &str) -> Result<Self, BadChannel> {
        check(name, false)?;
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The owner of a personal channel `user:<id>`, if this is one.
    pub fn personal_owner(&self) -> Option<&str> {
        self.0.strip_prefix("user:")
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for ChannelName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A glob over channel names: `*` matches any run of characters (including none), every other
/// character matches itself. Used for token claims and the presence options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPattern(String);

impl ChannelPattern {
    /// Accepts the channel alphabet plus `*`.
    pub fn parse(pattern: &str) -> Result<Self, BadChannel> {
        check(pattern, true)?;
        Ok(Self(pattern.to_owned()))
    }

    /// Whether `name` matches, in O(pattern × name) at worst: a hostile pattern cannot make the
    /// backtracking exponential.
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }
}

/// Iterative glob matching with single-star backtracking: O(pattern × name) worst case.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["room:1", "user:alice", "a", "news/eu.de", "x=y@z-1_2"] {
            assert_eq!(ChannelName::parse(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn refuses_hostile_names() {
        assert_eq!(ChannelName::parse(""), Err(BadChannel::Empty));
        assert_eq!(ChannelName::parse(&"a".repeat(129)), Err(BadChannel::TooLong));
        assert_eq!(ChannelName::parse("a*"), Err(BadChannel::BadChar('*')));
        assert_eq!(ChannelName::parse("{a}"), Err(BadChannel::BadChar('{')));
        assert_eq!(ChannelName::parse("a\nb"), Err(BadChannel::BadChar('\n')));
        assert_eq!(ChannelName::parse("a b"), Err(BadChannel::BadChar(' ')));
        assert_eq!(ChannelName::parse("é"), Err(BadChannel::BadChar('é')));
    }

    #[test]
    fn personal_channels_name_their_owner() {
        assert_eq!(ChannelName::parse("user:bob").unwrap().personal_owner(), Some("bob"));
        assert_eq!(ChannelName::parse("room:bob").unwrap().personal_owner(), None);
    }

    #[test]
    fn globs_match_like_shells() {
        let m = |p: &str, s: &str| ChannelPattern::parse(p).unwrap().matches(s);
        assert!(m("*", "anything"));
        assert!(m("room:*", "room:1"));
        assert!(!m("room:*", "rooms:1"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exact2"));
        assert!(m("**", ""));
        assert!(!m("a*a*a*a*b", &"a".repeat(100)));
    }
}

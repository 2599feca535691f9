//! SSE cursors: the `id:` of every event, with which a stream resumes all its channels.
//!
//! A cursor is `<digest>.<offset>.<offset>...`: one offset per channel, in the stream's channel
//! order, after a digest of the channels' epochs (FNV-1a, 64 bits, 16 hex digits). Offsets move
//! with every event and epochs almost never, so the epochs are not repeated in every id: a
//! stream over 128 channels carries ids of a few hundred bytes, not kilobytes. On resume the
//! node reads each channel's current epoch; if their digest matches, every offset is a position
//! in its channel's epoch. If it does not (some channel's history was lost, or the cursor is
//! foreign), no offset can be trusted, and every channel answers `recovered: false`.
//!
//! The older form, `epoch:offset,epoch:offset,...`, is still read. This module parses and
//! formats; `sse.rs` resolves a digest against the engine.

use crate::engine::{Epoch, Offset, Position};

/// What a `Last-Event-ID` or `?since=` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// No cursor: the stream starts live.
    Fresh,
    /// The current form: a digest of the epochs and one offset per channel.
    Digest { digest: u64, offsets: Vec<Offset> },
    /// The older form: every channel's epoch and offset, or nothing (an empty part) for a
    /// channel the client has no position in yet, which starts live. Clients that keep their
    /// own positions, and add channels to a stream, write this form.
    Positions(Vec<Option<Position>>),
    /// A cursor that fits no stream of this many channels: the client expected a replay that
    /// cannot be given, so every channel answers `recovered: false`.
    Unusable,
}

impl Cursor {
    /// Reads a cursor for a stream of `n` channels.
    pub fn parse(text: Option<&str>, n: usize) -> Cursor {
        let Some(text) = text.filter(|t| !t.is_empty()) else { return Cursor::Fresh };
        let parsed = match text.split_once('.') {
            Some((digest, offsets)) if digest.len() == 16 => parse_digest(digest, offsets),
            _ => parse_positions(text),
        };
        match parsed {
            Some(Cursor::Digest { offsets, .. }) if offsets.len() != n => Cursor::Unusable,
            Some(Cursor::Positions(list)) if list.len() != n => Cursor::Unusable,
            Some(cursor) => cursor,
            None => Cursor::Unusable,
        }
    }
}

fn parse_digest(digest: &str, offsets: &str) -> Option<Cursor> {
    let digest = u64::from_str_radix(digest, 16).ok()?;
    let offsets = offsets.split('.').map(|o| o.parse().ok()).collect::<Option<Vec<Offset>>>()?;
    Some(Cursor::Digest { digest, offsets })
}

fn parse_positions(text: &str) -> Option<Cursor> {
    let list = text
        .split(',')
        .map(|part| {
            if part.is_empty() {
                return Some(None);
            }
            let (epoch, offset) = part.rsplit_once(':')?;
            if epoch.is_empty() {
                return None;
            }
            Some(Some(Position { epoch: Epoch::new(epoch), offset: offset.parse().ok()? }))
        })
        .collect::<Option<Vec<Option<Position>>>>()?;
    Some(Cursor::Positions(list))
}

/// The digest of a stream's epochs, in channel order.
pub fn digest<'a>(epochs: impl IntoIterator<Item = &'a Epoch>) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut hash = OFFSET_BASIS;
    for epoch in epochs {
        for &b in epoch.as_str().as_bytes().iter().chain(b",") {
            hash = (hash ^ b as u64).wrapping_mul(PRIME);
        }
    }
    hash
}

/// Writes the cursor for `positions` into `out`: the digest given, then every offset.
pub fn write(out: &mut Vec<u8>, digest: u64, positions: &[Position]) {
    use std::io::Write;
    let _ = write!(out, "{digest:016x}");
    for p in positions {
        let _ = write!(out, ".{}", p.offset);
    }
}

/// A position no history matches: epochs are hex, so `-` never is one.
pub fn unusable() -> Position {
    Position { epoch: Epoch::new("-"), offset: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(epoch: &str, offset: Offset) -> Position {
        Position { epoch: Epoch::new(epoch), offset }
    }

    #[test]
    fn cursors_round_trip_with_one_digest_for_all_epochs() {
        let positions = vec![pos("ab12", 4), pos("cd34", 0)];
        let d = digest(positions.iter().map(|p| &p.epoch));
        let mut text = Vec::new();
        write(&mut text, d, &positions);
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text, format!("{d:016x}.4.0"));
        assert_eq!(Cursor::parse(Some(&text), 2), Cursor::Digest { digest: d, offsets: vec![4, 0] });
        assert_ne!(d, digest([&Epoch::new("cd34"), &Epoch::new("ab12")]), "the order of the channels counts");
        assert_ne!(d, digest([&Epoch::new("ab1"), &Epoch::new("2cd34")]), "epochs do not run together");
    }

    #[test]
    fn the_older_form_is_still_read() {
        let c = Cursor::parse(Some("ab:4,cd:0"), 2);
        assert_eq!(c, Cursor::Positions(vec![Some(pos("ab", 4)), Some(pos("cd", 0))]));
    }

    #[test]
    fn an_empty_part_of_the_older_form_is_a_channel_without_a_position() {
        let c = Cursor::parse(Some("ab:4,,cd:0"), 3);
        assert_eq!(c, Cursor::Positions(vec![Some(pos("ab", 4)), None, Some(pos("cd", 0))]));
        assert_eq!(Cursor::parse(Some(","), 2), Cursor::Positions(vec![None, None]));
        assert_eq!(Cursor::parse(Some("ab:4,"), 3), Cursor::Unusable, "one part per channel still");
    }

    #[test]
    fn cursors_that_fit_no_stream_are_unusable_and_none_is_fresh() {
        assert_eq!(Cursor::parse(None, 1), Cursor::Fresh);
        assert_eq!(Cursor::parse(Some(""), 1), Cursor::Fresh);
        assert_eq!(Cursor::parse(Some("ab:4,cd:0"), 3), Cursor::Unusable);
        assert_eq!(Cursor::parse(Some("0123456789abcdef.1.2"), 3), Cursor::Unusable);
        assert_eq!(Cursor::parse(Some("0123456789abcdef.x"), 1), Cursor::Unusable);
        assert_eq!(Cursor::parse(Some("garbage"), 1), Cursor::Unusable);
        assert_eq!(Cursor::parse(Some(":4"), 1), Cursor::Unusable);
        assert_eq!(Cursor::parse(Some("ab:x"), 1), Cursor::Unusable);
    }
}

//! Bans, known to every node. The hash `pushd:bans` (user -> until, Unix ms) is the truth; each
//! node keeps a copy, so that letting a user in costs no round trip to Redis. A ban or unban
//! writes the hash and announces the change on the pub/sub channel of the same name in one
//! script call (`bans.lua`), and every node applies the announcements in the order Redis sends
//! them.
//!
//! The copy is loaded each time the control subscription is made (at start, and after the
//! pub/sub connection came back: announcements sent while it was down are lost, the hash is
//! not). Announcements that arrive between the SUBSCRIBE and the load's answer are kept and
//! applied on top of what the load read, in order: each one states the user's whole ban, so
//! applying one the load already saw changes nothing, and none can fall in between. Until a
//! load has finished, or while the pub/sub connection is down, the copy is not trusted and the
//! node asks Redis, as it did for every connect before.
//!
//! A copy that says "banned" is checked against Redis before refusing anyone (bans are rare;
//! refusals rarer): an unban is in effect on every node as soon as it is answered. A ban is in
//! effect on every node that answered the kick's survey once the kick is answered, because the
//! survey travels on the same pub/sub connection, after the announcement.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::locks::lock;

/// One user's ban as announced: `until_ms` of `None` lifts it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Change {
    pub user: String,
    pub until_ms: Option<u64>,
}

/// This node's copy of the bans.
#[derive(Default)]
pub(super) struct Bans {
    state: std::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    users: HashMap<String, u64>,
    phase: Phase,
    /// Counts loads begun, so that a load overtaken by a newer one is not applied.
    load: u64,
}

#[derive(Default)]
enum Phase {
    /// Not loaded (at start, or announcements may have been missed since).
    #[default]
    Unknown,
    /// A load is under way; announcements wait here for it.
    Loading(Vec<Change>),
    Loaded,
}

impl Bans {
    /// When `user`'s ban ends if the copy says banned at `now_ms`; `None` if the copy cannot
    /// tell (not loaded).
    pub(super) fn known(&self, user: &str, now_ms: u64) -> Option<Option<u64>> {
        let state = lock(&self.state);
        matches!(state.phase, Phase::Loaded).then(|| state.users.get(user).copied().filter(|until| *until > now_ms))
    }

    /// Called before the control SUBSCRIBE: from now on announcements are kept for the load.
    /// Returns the load's number for `loaded`.
    pub(super) fn begin_load(&self) -> u64 {
        let mut state = lock(&self.state);
        state.load += 1;
        state.phase = Phase::Loading(Vec::new());
        state.load
    }

    /// The hash as load `load` read it: becomes the copy, with the announcements kept since the
    /// SUBSCRIBE applied on top. Ignored if a newer load has begun or the copy was forgotten.
    pub(super) fn loaded(&self, load: u64, users: HashMap<String, u64>) {
        let mut state = lock(&self.state);
        if state.load != load {
            return;
        }
        let Phase::Loading(waiting) = std::mem::replace(&mut state.phase, Phase::Loaded) else {
            state.phase = Phase::Unknown;
            return;
        };
        state.users = users;
        for change in waiting {
            state.apply(change);
        }
    }

    /// The pub/sub connection went away: announcements may have been missed.
    pub(super) fn forget(&self) {
        let mut state = lock(&self.state);
        state.phase = Phase::Unknown;
        state.users = HashMap::new();
    }

    /// An announcement from the bans channel.
    pub(super) fn on_change(&self, text: &str) {
        let Ok(change) = serde_json::from_str::<Change>(text) else {
            return tracing::warn!("unreadable ban announcement");
        };
        let mut state = lock(&self.state);
        match &mut state.phase {
            Phase::Loaded => state.apply(change),
            Phase::Loading(waiting) => waiting.push(change),
            Phase::Unknown => {}
        }
    }
}

impl State {
    fn apply(&mut self, change: Change) {
        match change.until_ms {
            Some(until) => self.users.insert(change.user, until),
            None => self.users.remove(&change.user),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(user: &str, until_ms: Option<u64>) -> String {
        serde_json::to_string(&Change { user: user.into(), until_ms }).unwrap()
    }

    #[test]
    fn nothing_is_known_before_a_load_and_after_the_connection_went_away() {
        let bans = Bans::default();
        assert_eq!(bans.known("u", 0), None);
        bans.on_change(&change("u", Some(10)));
        let load = bans.begin_load();
        assert_eq!(bans.known("u", 0), None, "not while loading");
        bans.loaded(load, HashMap::new());
        assert_eq!(bans.known("u", 0), Some(None), "an announcement before the SUBSCRIBE is the load's to see");
        bans.forget();
        assert_eq!(bans.known("u", 0), None);
    }

    #[test]
    fn announcements_during_a_load_apply_on_top_of_it_in_order() {
        let bans = Bans::default();
        let load = bans.begin_load();
        bans.on_change(&change("a", Some(50)));
        bans.on_change(&change("b", None));
        bans.on_change(&change("c", Some(70)));
        bans.on_change(&change("c", None));
        // The load read "b" and "c" before their changes, and "a" before its ban.
        bans.loaded(load, HashMap::from([("b".into(), 90), ("c".into(), 90), ("d".into(), 90)]));
        assert_eq!(bans.known("a", 0), Some(Some(50)));
        assert_eq!(bans.known("b", 0), Some(None));
        assert_eq!(bans.known("c", 0), Some(None));
        assert_eq!(bans.known("d", 0), Some(Some(90)));
        assert_eq!(bans.known("d", 90), Some(None), "a lapsed ban bans nobody");
        bans.on_change(&change("d", None));
        bans.on_change(&change("e", Some(5)));
        assert_eq!(bans.known("d", 0), Some(None));
        assert_eq!(bans.known("e", 0), Some(Some(5)));
    }

    #[test]
    fn a_load_overtaken_by_a_newer_one_or_a_lost_connection_is_not_applied() {
        let bans = Bans::default();
        let first = bans.begin_load();
        let second = bans.begin_load();
        bans.loaded(first, HashMap::from([("a".into(), 90)]));
        assert_eq!(bans.known("a", 0), None);
        bans.forget();
        bans.loaded(second, HashMap::from([("a".into(), 90)]));
        assert_eq!(bans.known("a", 0), None);
        let third = bans.begin_load();
        bans.loaded(third, HashMap::from([("a".into(), 90)]));
        assert_eq!(bans.known("a", 0), Some(Some(90)));
    }
}

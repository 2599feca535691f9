//! A fixed set of independently locked parts, one picked by a key's hash, so that work on one
//! channel (or connection) never waits on another's lock. The hub and the memory engine shard
//! their maps this way.

use std::hash::{BuildHasher, Hash, RandomState};

/// Parts per sharded map: enough that two busy channels rarely share a lock on a many-core
/// machine, few enough that a sweep over all of them is cheap.
const SHARDS: usize = 64;

/// `SHARDS` values of `T` (typically a locked map), addressed by key.
pub struct Sharded<T> {
    hasher: RandomState,
    parts: Vec<T>,
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Self { hasher: RandomState::new(), parts: (0..SHARDS).map(|_| T::default()).collect() }
    }
}

impl<T> Sharded<T> {
    /// The part that holds `key`.
    pub fn of<K: Hash + ?Sized>(&self, key: &K) -> &T {
        &self.parts[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// Every part, for sweeps and listings.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.parts.iter()
    }
}

impl<'a, T> IntoIterator for &'a Sharded<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.parts.iter()
    }
}

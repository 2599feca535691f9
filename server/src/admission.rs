//! Admission: whether one more client session may start on this node. Three limits, checked
//! together under one lock (sessions start and end far less often than messages flow): the
//! node's `--max-connections`, and per user and per client address, so that one account or one
//! host cannot take every slot. A `Slot` gives its places back when it is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::locks::lock;

/// Why a client connection was refused before its session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node is draining for a restart.
    Draining,
    /// `--max-connections` reached.
    Full,
    /// The user already holds `--max-connections-per-user` sessions here.
    UserLimit,
    /// The client's address already holds `--max-connections-per-ip` sessions here.
    IpLimit,
}

impl Refusal {
    /// The `reason` label of `pushd_connections_refused_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Draining => "draining",
            Refusal::Full => "full",
            Refusal::UserLimit => "user_limit",
            Refusal::IpLimit => "ip_limit",
        }
    }

    /// What the client should do, for the answer's body.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Draining => "node is draining for a restart: connect to another node",
            Refusal::Full => "node is full (--max-connections): connect to another node",
            Refusal::UserLimit => "too many connections for this user (--max-connections-per-user): close one first",
            Refusal::IpLimit => "too many connections from this address (--max-connections-per-ip): close one first",
        }
    }

    /// Whether another node may take the client (503) or the client must back off (429).
    pub fn elsewhere(self) -> bool {
        matches!(self, Refusal::Draining | Refusal::Full)
    }
}

/// The limits, and the places taken.
pub struct Admission {
    max: usize,
    /// 0 = no limit.
    per_user: usize,
    /// 0 = no limit.
    per_ip: usize,
    taken: Mutex<Taken>,
}

#[derive(Default)]
struct Taken {
    total: usize,
    users: HashMap<Arc<str>, usize>,
    ips: HashMap<IpAddr, usize>,
}

/// One admitted session's places; dropping it frees them.
pub struct Slot {
    admission: Arc<Admission>,
    user: Arc<str>,
    ip: IpAddr,
}

impl Admission {
    pub fn new(max: usize, per_user: usize, per_ip: usize) -> Arc<Self> {
        Arc::new(Self { max, per_user, per_ip, taken: Mutex::default() })
    }

    /// Takes a place for `user` at `ip`, or says which limit is in the way.
    pub fn admit(self: &Arc<Self>, user: &str, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut taken = lock(&self.taken);
        let over = |limit: usize, count: Option<&usize>| limit > 0 && count.is_some_and(|n| *n >= limit);
        if taken.total >= self.max {
            return Err(Refusal::Full);
        }
        if over(self.per_user, taken.users.get(user)) {
            return Err(Refusal::UserLimit);
        }
        if over(self.per_ip, taken.ips.get(&ip)) {
            return Err(Refusal::IpLimit);
        }
        taken.total += 1;
        let user: Arc<str> = user.into();
        *taken.users.entry(user.clone()).or_default() += 1;
        *taken.ips.entry(ip).or_default() += 1;
        Ok(Slot { admission: self.clone(), user, ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = lock(&self.admission.taken);
        taken.total = taken.total.saturating_sub(1);
        release(&mut taken.users, &self.user);
        release(&mut taken.ips, &self.ip);
    }
}

/// Takes one from `key`'s count, forgetting keys that reach 0 (so the maps hold only who is
/// connected now).
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn each_limit_refuses_on_its_own_and_places_come_back() {
        let a = Admission::new(4, 2, 3);
        let s1 = a.admit("alice", ip(1)).unwrap();
        let _s2 = a.admit("alice", ip(1)).unwrap();
        assert_eq!(a.admit("alice", ip(2)).err(), Some(Refusal::UserLimit));
        let _s3 = a.admit("bob", ip(1)).unwrap();
        assert_eq!(a.admit("carol", ip(1)).err(), Some(Refusal::IpLimit));
        let _s4 = a.admit("carol", ip(2)).unwrap();
        assert_eq!(a.admit("dave", ip(3)).err(), Some(Refusal::Full));
        drop(s1);
        assert!(a.admit("alice", ip(3)).is_ok(), "a freed place is free for every limit");
    }

    #[test]
    fn zero_means_no_limit_and_nobody_lingers_in_the_maps() {
        let a = Admission::new(100, 0, 0);
        let slots: Vec<Slot> = (0..50).map(|_| a.admit("alice", ip(1)).unwrap()).collect();
        drop(slots);
        let taken = a.taken.lock().unwrap();
        assert_eq!((taken.total, taken.users.len(), taken.ips.len()), (0, 0, 0));
    }
}

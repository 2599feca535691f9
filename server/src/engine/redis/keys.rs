//! Every Redis key and pub/sub channel name pushd uses, in one place.
//!
//! Keys of one channel carry the channel as a Redis Cluster hash tag (`{room:1}`), so they live
//! in one slot and one script can touch them all; so does the channel's sharded pub/sub channel.
//! Channel names are validated `ChannelName`s (no braces, no globs), so a name can never break
//! out of its tag. The registry's keys share the tag `{registry}`, so one read (`MGET`) can take
//! every node's entry in a cluster too.

use crate::channel::ChannelName;

/// Builds key names under a prefix (default `pushd:`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// The channel's history stream: entries `<offset>-0`.
    pub fn stream(&self, ch: &ChannelName) -> String {
        format!("{}{{{ch}}}:stream", self.prefix)
    }

    /// The channel's meta hash: `epoch` and `top`.
    pub fn meta(&self, ch: &ChannelName) -> String {
        format!("{}{{{ch}}}:meta", self.prefix)
    }

    /// The publish result kept for an idempotency key.
    pub fn idempotency(&self, ch: &ChannelName, key: &str) -> String {
        format!("{}{{{ch}}}:idem:{key}", self.prefix)
    }

    /// Presence: conn -> client JSON.
    pub fn presence(&self, ch: &ChannelName) -> String {
        format!("{}{{{ch}}}:presence", self.prefix)
    }

    /// Presence expiry: conn scored by the time its entry lapses unless refreshed.
    pub fn presence_expiry(&self, ch: &ChannelName) -> String {
        format!("{}{{{ch}}}:presence:exp", self.prefix)
    }

    /// The pub/sub channel carrying the channel's live messages between nodes.
    pub fn pubsub(&self, ch: &ChannelName) -> String {
        format!("{}{{{ch}}}", self.prefix)
    }

    /// The channel a pub/sub name belongs to, if it is one of ours.
    pub fn channel_of(&self, pubsub: &str) -> Option<ChannelName> {
        let inner = pubsub.strip_prefix(&self.prefix)?.strip_prefix('{')?.strip_suffix('}')?;
        ChannelName::parse(inner).ok()
    }

    /// The control channel every node listens to (surveys).
    pub fn control(&self) -> String {
        format!("{}control", self.prefix)
    }

    /// Where survey answers for `node` arrive.
    pub fn control_reply(&self, node: &str) -> String {
        format!("{}control:{node}", self.prefix)
    }

    /// Bans: a hash of user -> until (Unix ms), and the pub/sub channel of the same name on
    /// which every change to it is announced (`bans.rs`).
    pub fn bans(&self) -> String {
        format!("{}bans", self.prefix)
    }

    /// Sorted set of live node ids, each scored by when its entry lapses (Unix ms: its last
    /// heartbeat plus `--node-ttl`); lapsed ids are dropped on every heartbeat and every read.
    pub fn nodes(&self) -> String {
        format!("{}{{registry}}:nodes", self.prefix)
    }

    /// One node's info and stats, expiring when the node stops refreshing it.
    pub fn node(&self, id: &str) -> String {
        format!("{}{{registry}}:node:{id}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_channel_hash_tag_and_round_trip() {
        let k = Keys::new("pushd:");
        let ch = ChannelName::parse("room:1").unwrap();
        assert_eq!(k.stream(&ch), "pushd:{room:1}:stream");
        assert_eq!(k.meta(&ch), "pushd:{room:1}:meta");
        assert_eq!(k.pubsub(&ch), "pushd:{room:1}");
        assert_eq!(k.channel_of("pushd:{room:1}"), Some(ch));
        assert_eq!(k.channel_of("other:{room:1}"), None);
        assert_eq!(k.channel_of("pushd:{a*}"), None);
        assert_eq!(k.nodes(), "pushd:{registry}:nodes");
        assert_eq!(k.node("n1"), "pushd:{registry}:node:n1");
    }
}

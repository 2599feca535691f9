//! The admin API's answers (docs/ADMIN-API.md), defined once: `pushd` serialises them and
//! `pushctl` deserialises them, so the two cannot drift apart. Shapes only: no I/O, no checks,
//! no behaviour; the server's domain types (`ChannelName`, `Epoch`) stay in the server.
//!
//! Compatibility: a field the server may send as `null` is an `Option`; answers and rows take
//! `#[serde(default)]`, so a `pushctl` a version apart from the node fills an absent field with
//! zero or empty instead of refusing the whole answer. Renaming or retyping a field breaks the
//! contract: change docs/ADMIN-API.md in the same commit. Keys go out in declaration order, which
//! follows the examples in the contract (clients must not rely on it).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The longest ban `POST /admin/kick` accepts, in seconds (ten years): longer ones are refused
/// with 400 rather than wrapping around into a ban that ended in the past.
pub const MAX_BAN_S: u64 = 10 * 365 * 24 * 3600;

/// Which nodes a cluster answer covers. Both fields empty: every registered node answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Coverage {
    /// Registered nodes that did not answer in time (node ids, nothing else).
    pub missing: Vec<String>,
    /// Set when the node asked could not read the registry (its Redis is away): the answer is
    /// that node's alone, the other nodes are unknown, and this says why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub others_unknown: Option<String>,
}

impl Coverage {
    /// Nodes that answered in time, out of a registry that could be read.
    pub fn missing(missing: Vec<String>) -> Self {
        Self { missing, others_unknown: None }
    }

    /// Whether the answer leaves any node out.
    pub fn is_partial(&self) -> bool {
        !self.missing.is_empty() || self.others_unknown.is_some()
    }
}

/// `GET /admin/stats`: cluster totals, each answering node's stats, and Redis' own view.
/// What `pushctl stats` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatsAnswer {
    /// `"redis"` or `"memory"`.
    pub engine: String,
    pub totals: Totals,
    /// The nodes that answered, sorted by id.
    pub nodes: Vec<NodeStats>,
    /// Which nodes the answer covers.
    #[serde(flatten)]
    pub coverage: Coverage,
    /// `None` on the memory engine, or when Redis could not be asked.
    pub redis: Option<RedisStats>,
}

/// Sums over the nodes that answered: `nodes` counts them; `users` and `channels` are unique
/// across the cluster, so they are not the sums of the nodes' own counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub nodes: u64,
    pub connections: u64,
    pub users: u64,
    pub subscriptions: u64,
    pub channels: u64,
    pub msgs_in_per_s: f64,
    pub msgs_out_per_s: f64,
    pub replays: u64,
    pub slow_consumers: u64,
    /// The longest uptime among the nodes.
    pub uptime_s: u64,
}

/// One node as `/admin/stats` lists it: its registry entry, read fresh, plus how long it has
/// been up and its message rates over the last second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStats {
    #[serde(flatten)]
    pub info: NodeInfo,
    pub uptime_s: u64,
    pub msgs_in_per_s: f64,
    pub msgs_out_per_s: f64,
}

/// One node as the registry knows it (`/admin/nodes`): who and where it is and its counters as
/// of its last heartbeat (at most a second old). The node writes it, so it is also what the
/// engine stores under `pushd:nodes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeInfo {
    pub id: String,
    /// Address the node listens on.
    pub addr: String,
    /// The node's `pushd` version.
    pub version: String,
    /// Unix ms when the node started.
    pub started_ms: u64,
    /// Unix ms of this report.
    pub updated_ms: u64,
    pub connections: u64,
    pub users: u64,
    pub subscriptions: u64,
    pub channels: u64,
    /// Messages published through this node, ever.
    pub messages_in: u64,
    /// Messages delivered to this node's sockets, ever.
    pub messages_out: u64,
    pub replays: u64,
    pub slow_consumers: u64,
    /// Shutting down: refuses new sockets, drains the old ones.
    pub draining: bool,
}

/// Redis as the cluster's engine sees it. The first four come from Redis' INFO and are `None`
/// where INFO lacks them; the rest from `PUBSUB`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisStats {
    pub version: Option<String>,
    /// Human-readable, as Redis spells it (`1.2M`).
    pub used_memory: Option<String>,
    pub ops_per_sec: Option<u64>,
    pub connected_clients: Option<u64>,
    /// Every Redis pub/sub channel with a subscriber, pushd's or not.
    pub pubsub_channels: u64,
    pub pubsub_patterns: u64,
    /// pushd channels with the most subscribed nodes, highest first, at most 10.
    pub top_channels: Vec<TopChannel>,
}

/// A pushd channel (not its raw Redis name) and how many nodes subscribe to it in Redis
/// (`PUBSUB NUMSUB`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TopChannel {
    pub channel: String,
    pub subscribers: u64,
}

/// `GET /admin/nodes`: the registry as it stands, without surveying the nodes, so `missing`
/// is always empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodesAnswer {
    /// Sorted by id.
    pub nodes: Vec<NodeInfo>,
    /// Which nodes the answer covers.
    #[serde(flatten)]
    pub coverage: Coverage,
}

/// `GET /admin/connections`: open client connections across the cluster, sorted by node and
/// then by the connection's sequence number.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionsAnswer {
    pub connections: Vec<ConnectionInfo>,
    /// More matched than `limit`; the first ones are listed.
    pub truncated: bool,
    /// Which nodes the answer covers.
    #[serde(flatten)]
    pub coverage: Coverage,
}

/// One client connection as operators see it; also what each node answers the survey with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionInfo {
    /// `<node>.<sequence>`.
    pub conn: String,
    pub user: String,
    pub node: String,
    /// `ws` or `sse`.
    pub transport: String,
    /// The peer address; `None` where the node does not know it.
    pub remote: Option<String>,
    /// Unix ms when it connected.
    pub connected_ms: u64,
    /// The channels it subscribes to, sorted.
    pub channels: Vec<String>,
    /// Messages waiting in its send queue.
    pub queue: u64,
    pub messages_out: u64,
}

/// `GET /admin/channels`: channels with at least one subscriber somewhere.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelsAnswer {
    /// By subscribers or by rate, descending, as asked.
    pub channels: Vec<ChannelRow>,
    /// More matched than `limit`; the first ones are listed.
    pub truncated: bool,
    /// Which nodes the answer covers.
    #[serde(flatten)]
    pub coverage: Coverage,
}

/// One channel across the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelRow {
    pub channel: String,
    /// Subscribers on every node together.
    pub subscribers: u64,
    /// Nodes with at least one subscriber.
    pub nodes: u64,
    /// `None` (as `last_offset`) when the history could not be read.
    pub history_len: Option<u64>,
    pub last_offset: Option<u64>,
    /// Messages per second over the last second.
    pub rate: f64,
}

/// `GET /admin/channels/{channel}`: one channel's subscribers, presence and history bounds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelDetail {
    pub channel: String,
    /// Sorted like connections.
    pub subscribers: Vec<Subscriber>,
    /// `None` where presence is off for the channel.
    pub presence: Option<Vec<ClientInfo>>,
    pub history: HistoryBounds,
    /// Which nodes the answer covers.
    #[serde(flatten)]
    pub coverage: Coverage,
}

/// One subscriber of a channel; also what each node answers the survey with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Subscriber {
    pub conn: String,
    pub user: String,
    pub node: String,
}

/// One client present in a channel. Also the presence entry the engine stores and the
/// `presence` reply's items, so it takes no `#[serde(default)]`: a partial entry is refused,
/// not listed with blanks. Shared strings: a node holds one per subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub user: Arc<str>,
    pub conn: Arc<str>,
    pub node: Arc<str>,
}

/// The bounds of a channel's stored history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryBounds {
    /// The history's current epoch; offsets from another epoch are void.
    pub epoch: String,
    pub last_offset: u64,
    /// Messages kept.
    pub len: u64,
    /// `None` when nothing is kept.
    pub first_offset: Option<u64>,
}

/// `POST /admin/kick`: sockets closed on each node that answered, and the ban's end if one was
/// set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KickAnswer {
    /// Every node that answered, those that closed nothing included, sorted by node.
    pub closed: Vec<KickedOnNode>,
    pub total: u64,
    /// Unix ms when the user's ban lapses; `None` without `ban_s`.
    pub banned_until_ms: Option<u64>,
    /// Which nodes the answer covers.
    #[serde(flatten)]
    pub coverage: Coverage,
}

/// Sockets a kick closed on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KickedOnNode {
    pub node: String,
    pub count: u64,
}

/// `POST /admin/unban`: whether the user was banned until now. What `pushctl unban` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnbanAnswer {
    pub user: String,
    pub was_banned: bool,
}

#[cfg(test)]
mod tests {
    //! The examples of docs/ADMIN-API.md: each reads into its type and writes back to the same
    //! JSON, so a field renamed or retyped here fails before it reaches a client.

    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::*;

    /// Reads `json` into `T`, writes it back, and compares as JSON values (key order aside).
    fn round_trips<T: DeserializeOwned + Serialize>(json: &str) -> T {
        let want: Value = serde_json::from_str(json).unwrap();
        let typed: T = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), want);
        typed
    }

    #[test]
    fn stats_answer() {
        let stats: StatsAnswer = round_trips(
            r#"{"engine": "redis",
                "totals": {"nodes": 3, "connections": 60, "users": 20, "subscriptions": 120, "channels": 10,
                           "msgs_in_per_s": 12.0, "msgs_out_per_s": 340.5, "replays": 4,
                           "slow_consumers": 0, "uptime_s": 3600},
                "nodes": [{"id": "n0", "addr": "127.0.0.1:8081", "version": "0.1.0", "uptime_s": 3600,
                           "started_ms": 1795436400000, "updated_ms": 1795440000000,
                           "connections": 20, "users": 7, "subscriptions": 40, "channels": 10,
                           "messages_in": 1000, "messages_out": 30000, "msgs_in_per_s": 4.0,
                           "msgs_out_per_s": 113.5, "replays": 1, "slow_consumers": 0, "draining": false}],
                "missing": [],
                "redis": {"version": "7.0.15", "used_memory": "1.2M", "ops_per_sec": 350,
                          "connected_clients": 15, "pubsub_channels": 12, "pubsub_patterns": 0,
                          "top_channels": [{"channel": "room:1", "subscribers": 3}]}}"#,
        );
        assert_eq!((stats.nodes[0].info.id.as_str(), stats.nodes[0].uptime_s), ("n0", 3600));
        round_trips::<StatsAnswer>(
            r#"{"engine": "redis", "totals": {"nodes": 0, "connections": 0, "users": 0, "subscriptions": 0,
                "channels": 0, "msgs_in_per_s": 0.0, "msgs_out_per_s": 0.0, "replays": 0, "slow_consumers": 0,
                "uptime_s": 0}, "nodes": [], "missing": ["n1"],
                "redis": {"version": null, "used_memory": null, "ops_per_sec": null, "connected_clients": null,
                          "pubsub_channels": 0, "pubsub_patterns": 0, "top_channels": []}}"#,
        );
    }

    #[test]
    fn memory_engine_sends_redis_null() {
        let stats = StatsAnswer { engine: "memory".into(), ..StatsAnswer::default() };
        assert_eq!(serde_json::to_value(&stats).unwrap()["redis"], Value::Null);
    }

    #[test]
    fn nodes_answer() {
        round_trips::<NodesAnswer>(
            r#"{"nodes": [{"id": "n0", "addr": "127.0.0.1:8081", "version": "0.1.0", "started_ms": 1795436400000,
                           "updated_ms": 1795440000000, "connections": 20, "users": 7, "subscriptions": 40,
                           "channels": 10, "messages_in": 1000, "messages_out": 30000, "replays": 1,
                           "slow_consumers": 0, "draining": true}],
                "missing": []}"#,
        );
    }

    #[test]
    fn connections_answer() {
        round_trips::<ConnectionsAnswer>(
            r#"{"connections": [{"conn": "n0.17", "user": "u7", "node": "n0", "transport": "ws",
                                 "remote": "127.0.0.1:50412", "connected_ms": 1795440000000,
                                 "channels": ["room:1"], "queue": 0, "messages_out": 42},
                                {"conn": "n0.18", "user": "u8", "node": "n0", "transport": "sse",
                                 "remote": null, "connected_ms": 1795440000000,
                                 "channels": [], "queue": 3, "messages_out": 0}],
                "truncated": false, "missing": []}"#,
        );
    }

    #[test]
    fn channels_answer() {
        round_trips::<ChannelsAnswer>(
            r#"{"channels": [{"channel": "room:1", "subscribers": 30, "nodes": 3, "history_len": 100,
                              "last_offset": 100, "rate": 2.5},
                             {"channel": "room:2", "subscribers": 1, "nodes": 1, "history_len": null,
                              "last_offset": null, "rate": 0.0}],
                "truncated": false, "missing": []}"#,
        );
    }

    #[test]
    fn channel_detail() {
        round_trips::<ChannelDetail>(
            r#"{"channel": "room:1",
                "subscribers": [{"conn": "n0.17", "user": "u7", "node": "n0"}],
                "presence": [{"user": "u7", "conn": "n0.17", "node": "n0"}],
                "history": {"epoch": "5f0c", "last_offset": 100, "len": 100, "first_offset": 1},
                "missing": []}"#,
        );
        let off: ChannelDetail = round_trips(
            r#"{"channel": "news", "subscribers": [], "presence": null,
                "history": {"epoch": "5f0c", "last_offset": 0, "len": 0, "first_offset": null}, "missing": ["n2"]}"#,
        );
        assert_eq!(off.presence, None);
    }

    #[test]
    fn kick_answer() {
        round_trips::<KickAnswer>(
            r#"{"closed": [{"node": "n0", "count": 2}, {"node": "n1", "count": 0}, {"node": "n2", "count": 1}],
                "total": 3, "banned_until_ms": 1795440060000, "missing": []}"#,
        );
        round_trips::<KickAnswer>(r#"{"closed": [], "total": 0, "banned_until_ms": null, "missing": ["n1"]}"#);
    }

    #[test]
    fn absent_fields_read_as_zero_or_empty() {
        let stats: StatsAnswer = serde_json::from_str(r#"{"engine": "memory", "nodes": [{"id": "dev"}]}"#).unwrap();
        assert_eq!((stats.nodes[0].info.id.as_str(), stats.nodes[0].info.connections), ("dev", 0));
        assert_eq!((stats.coverage.is_partial(), stats.redis), (false, None));
        let detail: ChannelDetail = serde_json::from_str(r#"{"channel": "news", "history": {"epoch": "e"}}"#).unwrap();
        assert_eq!((detail.history.len, detail.history.first_offset, detail.presence), (0, None, None));
    }

    #[test]
    fn a_presence_entry_needs_all_three_fields() {
        assert!(serde_json::from_str::<ClientInfo>(r#"{"user": "u7", "conn": "n0.17"}"#).is_err());
    }
}

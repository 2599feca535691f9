//! What one node answers when the cluster surveys it: its stats, connections, channels, a
//! channel's subscribers, and kicks. The admin API (`api/admin.rs`) asks every node through the
//! engine's `survey` and merges the answers; this module is the answering side, and reads the
//! node's hub only: it never changes a session except to close the ones a kick names.

use std::collections::HashMap;

use pushd_wire::{ConnectionInfo, NodeStats, Subscriber};
use serde::{Deserialize, Serialize};

use crate::channel::{ChannelName, ChannelPattern};
use crate::engine::SurveyHandler;
use crate::node::Node;
use crate::protocol::{Close, CloseCode};

/// A request every node answers for itself.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SurveyRequest {
    Stats,
    /// At most `limit` + 1 connections per node, the first by `conn_order`: merged, they still
    /// give the first `limit` of the cluster, and whether there were more.
    Connections {
        user: Option<String>,
        channel: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
    Channels {
        pattern: Option<String>,
    },
    Channel {
        channel: String,
    },
    Kick {
        conns: Vec<String>,
        user: Option<String>,
        reason: String,
    },
}

/// One node's answer to `Stats`: its stats as the admin API lists them, plus what the cluster
/// totals need to count unique users and channels (which the answer leaves out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    #[serde(flatten)]
    pub stats: NodeStats,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channel_names: Vec<String>,
}

/// A channel's local subscribers and message rate on one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelOnNode {
    pub channel: String,
    pub subscribers: u64,
    pub rate: f64,
}

/// One node's answer to `Kick`: how many of its sockets it closed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Kicked {
    pub count: u64,
}

impl SurveyHandler for Node {
    fn answer(&self, request: &str) -> String {
        let answer = match serde_json::from_str::<SurveyRequest>(request) {
            Ok(SurveyRequest::Stats) => serde_json::to_value(self.stats()),
            Ok(SurveyRequest::Connections { user, channel, limit }) => {
                let mut list = self.connections(user.as_deref(), channel.as_deref());
                list.truncate(limit.map_or(usize::MAX, |l| l.saturating_add(1)));
                serde_json::to_value(list)
            }
            Ok(SurveyRequest::Channels { pattern }) => serde_json::to_value(self.local_channels(pattern.as_deref())),
            Ok(SurveyRequest::Channel { channel }) => serde_json::to_value(self.subscribers_of(&channel)),
            Ok(SurveyRequest::Kick { conns, user, reason }) => {
                serde_json::to_value(self.kick(&conns, user.as_deref(), reason))
            }
            Err(e) => Ok(serde_json::json!({ "error": format!("unknown control request: {e}") })),
        };
        answer.expect("control answers serialise").to_string()
    }
}

impl Node {
    /// This node's stats for `pushctl stats`, with its users and channels for the totals.
    pub fn stats(&self) -> NodeReport {
        let info = self.info(&self.addr());
        let (msgs_in_per_s, msgs_out_per_s) = self.rates();
        let mut user_ids: Vec<String> = self.hub().sessions().iter().map(|s| s.info.user.to_string()).collect();
        user_ids.sort();
        user_ids.dedup();
        let channel_names = self.hub().channels().into_iter().map(|c| c.channel.to_string()).collect();
        let stats = NodeStats { info, uptime_s: self.uptime().as_secs(), msgs_in_per_s, msgs_out_per_s };
        NodeReport { stats, user_ids, channel_names }
    }

    fn connections(&self, user: Option<&str>, channel: Option<&str>) -> Vec<ConnectionInfo> {
        let mut channels_of: HashMap<String, Vec<String>> = HashMap::new();
        for stat in self.hub().channels() {
            for handle in self.hub().channel_subscribers(&stat.channel) {
                channels_of.entry(handle.conn.to_string()).or_default().push(stat.channel.to_string());
            }
        }
        let mut out: Vec<ConnectionInfo> = self
            .hub()
            .sessions()
            .into_iter()
            .filter(|h| user.is_none_or(|u| &*h.info.user == u))
            .map(|h| {
                let mut channels = channels_of.remove(&*h.conn).unwrap_or_default();
                channels.sort();
                ConnectionInfo {
                    conn: h.conn.to_string(),
                    user: h.info.user.to_string(),
                    node: self.config().node_id.clone(),
                    transport: h.info.transport.as_str().to_owned(),
                    remote: h.info.remote.map(|r| r.to_string()),
                    connected_ms: h
                        .info
                        .connected_at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    channels,
                    queue: h.queue_depth() as u64,
                    messages_out: h.messages_out(),
                }
            })
            .filter(|c| channel.is_none_or(|ch| c.channels.iter().any(|x| x == ch)))
            .collect();
        out.sort_by_key(|c| conn_order(&c.conn));
        out
    }

    fn local_channels(&self, pattern: Option<&str>) -> Vec<ChannelOnNode> {
        let pattern = pattern.and_then(|p| ChannelPattern::parse(p).ok());
        self.hub()
            .channels()
            .into_iter()
            .filter(|c| pattern.as_ref().is_none_or(|p| p.matches(c.channel.as_str())))
            .map(|c| ChannelOnNode { channel: c.channel.to_string(), subscribers: c.subscribers as u64, rate: c.rate })
            .collect()
    }

    fn subscribers_of(&self, channel: &str) -> Vec<Subscriber> {
        let Ok(channel) = ChannelName::parse(channel) else { return Vec::new() };
        let mut subscribers: Vec<Subscriber> = self
            .hub()
            .channel_subscribers(&channel)
            .into_iter()
            .map(|h| Subscriber {
                conn: h.conn.to_string(),
                user: h.info.user.to_string(),
                node: self.config().node_id.clone(),
            })
            .collect();
        subscribers.sort_by_key(|s| conn_order(&s.conn));
        subscribers
    }

    /// Closes the named connections and the user's sockets on this node with 4009.
    fn kick(&self, conns: &[String], user: Option<&str>, reason: String) -> Kicked {
        let close = Close::new(CloseCode::Kicked, reason);
        let mut count = conns.iter().map(|c| self.hub().disconnect(None, Some(c), close.clone())).sum::<usize>();
        if let Some(user) = user {
            count += self.hub().disconnect(Some(user), None, close);
        }
        self.metrics().kicks.inc_by(count as u64);
        Kicked { count: count as u64 }
    }
}

/// Orders connection ids `<node>.<sequence>` by node, then by sequence as a number.
pub fn conn_order(conn: &str) -> (String, u64) {
    match conn.rsplit_once('.') {
        Some((node, seq)) => (node.to_owned(), seq.parse().unwrap_or(u64::MAX)),
        None => (conn.to_owned(), u64::MAX),
    }
}

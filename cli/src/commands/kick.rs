//! `pushctl kick`: POST /admin/kick. Closes connections (4009) on whichever nodes hold them and
//! optionally bans their user cluster-wide.

use pushd_wire::KickAnswer;
use serde::Serialize;

use super::{Outcome, now_ms, show};
use crate::client::Client;
use crate::table::{self, Col};

/// Whom to kick.
#[derive(Debug)]
pub enum Target {
    /// These connection ids.
    Conns(Vec<String>),
    /// Every connection of `user`, banned for `ban_s` seconds if set.
    User { user: String, ban_s: Option<u64> },
}

/// The body of POST /admin/kick.
#[derive(Debug, Default, Serialize)]
struct KickRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    conns: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ban_s: Option<u64>,
}

pub async fn run(client: &Client, json: bool, target: Target, reason: Option<String>) -> anyhow::Result<Outcome> {
    let request = match target {
        Target::Conns(conns) => KickRequest { conns: Some(conns), reason, ..Default::default() },
        Target::User { user, ban_s } => KickRequest { user: Some(user), reason, ban_s, ..Default::default() },
    };
    let fetched = client.post::<KickAnswer>(&["admin", "kick"], &request, true).await?;
    let now = now_ms();
    show(&fetched, json, &fetched.body.coverage, |k| render(k, now))
}

/// The total, the sockets closed per node, and the ban's end.
pub fn render(kicked: &KickAnswer, now_ms: u64) -> String {
    let mut out = format!("closed {}", table::plural(kicked.total, "socket", "sockets"));
    if kicked.closed.iter().any(|c| c.count > 0) {
        const COLS: [Col; 2] = [Col::text("NODE"), Col::num("CLOSED")];
        let rows: Vec<Vec<String>> =
            kicked.closed.iter().filter(|c| c.count > 0).map(|c| vec![c.node.clone(), c.count.to_string()]).collect();
        out.push_str("\n\n");
        out.push_str(&table::render(&COLS, &rows));
        out.push('\n');
    }
    if let Some(until) = kicked.banned_until_ms {
        let left = until.saturating_sub(now_ms).div_ceil(1000);
        out.push_str(&format!("\nbanned until {} (in {})", table::utc(until), table::duration(left)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_snapshot() {
        let kicked: KickAnswer = serde_json::from_str(
            r#"{"closed": [{"node": "n0", "count": 2}, {"node": "n1", "count": 0}, {"node": "n2", "count": 1}],
                "total": 3, "banned_until_ms": 1795440060000, "missing": []}"#,
        )
        .unwrap();
        let want = "\
closed 3 sockets

NODE  CLOSED
n0         2
n2         1

banned until 2026-11-23 13:21:00 UTC (in 1m00s)";
        let got = render(&kicked, 1_795_440_000_000);
        assert_eq!(got, want, "got:\n{got}");
        table::assert_fits(&got);
    }

    #[test]
    fn kick_bodies_name_one_target() {
        let by_user = KickRequest { user: Some("u7".into()), ban_s: Some(300), ..Default::default() };
        assert_eq!(serde_json::to_string(&by_user).unwrap(), r#"{"user":"u7","ban_s":300}"#);
        let by_conn =
            KickRequest { conns: Some(vec!["n0.17".into()]), reason: Some("spam".into()), ..Default::default() };
        assert_eq!(serde_json::to_string(&by_conn).unwrap(), r#"{"conns":["n0.17"],"reason":"spam"}"#);
    }
}

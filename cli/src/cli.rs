//! The command line: one clap-derive tree whose doc comments are the help. It owns parsing and
//! the small value parsers (`--server`, `--ban`); it does no I/O. clap exits 2 on bad usage.

use clap::{Parser, Subcommand, ValueEnum};
use reqwest::Url;

/// pushctl: look inside a pushd cluster and act on it through any node's admin API.
///
/// Every node answers for the whole cluster. Exit status: 0 ok, 1 error, 2 bad usage,
/// 3 partial answer (some nodes did not reply in time; the answer is printed with a warning).
#[derive(Debug, Parser)]
#[command(name = "pushctl", version)]
pub struct Cli {
    /// Any pushd node (plain http://); it asks the others.
    #[arg(long, global = true, env = "PUSHCTL_SERVER", default_value = "http://127.0.0.1:8080",
          value_parser = parse_server)]
    pub server: Url,

    /// The cluster's admin key (the nodes' --admin-key), sent as a bearer token.
    #[arg(long, global = true, env = "PUSHD_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// Print the server's JSON answer (pretty) instead of tables, for scripts.
    #[arg(long, global = true)]
    pub json: bool,

    /// Seconds to wait for an answer; the node gets half a second less to hear from the others.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: Command,
}

/// What to show or do; each mirrors one /admin/* route.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Cluster totals, one row per node, and Redis pub/sub stats.
    Stats {
        /// Redraw every SECS seconds until Ctrl-C. Default 2.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2",
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        watch: Option<u64>,
    },

    /// The node registry as it stands (no survey of the nodes).
    Nodes,

    /// Open client connections across the cluster, sorted by node, then connection id.
    Connections {
        /// Only connections on this node id.
        #[arg(long)]
        node: Option<String>,
        /// Only connections of this user id.
        #[arg(long)]
        user: Option<String>,
        /// Only connections subscribed to this channel.
        #[arg(long)]
        channel: Option<String>,
        /// At most this many rows. Default (server's) 100, at most 10000.
        #[arg(long)]
        limit: Option<u32>,
    },

    /// Channels with at least one subscriber somewhere.
    Rooms {
        /// Only channels matching this glob, e.g. 'room:*'.
        #[arg(long, value_name = "GLOB")]
        pattern: Option<String>,
        /// Order, highest first. Default subscribers.
        #[arg(long, value_enum)]
        sort: Option<RoomSort>,
        /// At most this many rows. Default (server's) 100.
        #[arg(long)]
        limit: Option<u32>,
    },

    /// One channel: its subscribers, presence and history bounds.
    Room {
        /// The channel name, e.g. room:1.
        channel: String,
    },

    /// A channel's stored messages, oldest first.
    History {
        /// The channel name.
        channel: String,
        /// Only messages after this offset. Default: the newest ones.
        #[arg(long, value_name = "OFFSET")]
        since: Option<u64>,
        /// At most this many messages. Default (server's) 100, at most 1000.
        #[arg(long)]
        limit: Option<u32>,
    },

    /// Store a message in a channel's history and deliver it to its subscribers.
    Publish {
        /// The channel name.
        channel: String,
        /// The payload, any JSON value: '{"text":"hi"}', '"a string"', 42.
        #[arg(value_name = "JSON")]
        data: String,
        /// A label for the kind of message, e.g. chat.
        #[arg(long)]
        event: Option<String>,
        /// The publish's idempotency key (1-128 of A-Z a-z 0-9 _ . : -). Default: a fresh one.
        /// pushctl retries a publish the node could not store, or cannot say it stored, with
        /// this key, so the message is stored once.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },

    /// Close connections (code 4009) wherever they are, and optionally ban their user.
    Kick {
        /// Connection ids to close, e.g. n0.17 (see `pushctl connections`).
        #[arg(value_name = "CONN-ID", required_unless_present = "user", conflicts_with_all = ["user", "ban"])]
        conns: Vec<String>,
        /// Close every connection of this user id instead.
        #[arg(long)]
        user: Option<String>,
        /// Close reason the clients see.
        #[arg(long)]
        reason: Option<String>,
        /// Also refuse this user on every node for this long: 30s, 5m, 1h, 1h30m, 2d.
        #[arg(long, value_name = "DURATION", requires = "user", value_parser = parse_duration)]
        ban: Option<u64>,
    },

    /// Lift a user's ban (from `kick --ban`) on every node before it lapses.
    Unban {
        /// The banned user id.
        user: String,
    },
}

/// Order of `pushctl rooms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoomSort {
    /// Most subscribers first.
    Subscribers,
    /// Busiest (messages per second) first.
    Rate,
}

impl RoomSort {
    /// The value of `?sort=`.
    pub fn as_query(self) -> &'static str {
        match self {
            RoomSort::Subscribers => "subscribers",
            RoomSort::Rate => "rate",
        }
    }
}

/// Parses `--server`: an absolute http:// URL (this build has no TLS).
fn parse_server(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{e}: give a URL like http://127.0.0.1:8080"))?;
    match url.scheme() {
        "http" => Ok(url),
        "https" => Err("https is not supported by pushctl: use the node's plain http:// address".into()),
        other => Err(format!("scheme {other}: is not http: give a URL like http://127.0.0.1:8080")),
    }
}

/// Parses a duration like `30s`, `5m`, `1h30m` or `2d` into whole seconds (at least 1).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    const HINT: &str = "use a number with a unit: 30s, 5m, 1h, 1h30m, 2d";
    let mut total: u64 = 0;
    let mut digits = String::new();
    for ch in text.trim().chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("{text:?}: unknown unit {ch:?}: {HINT}")),
        };
        let n: u64 = digits.parse().map_err(|_| format!("{text:?}: {ch:?} needs a number before it: {HINT}"))?;
        total = n.checked_mul(unit).and_then(|s| total.checked_add(s)).ok_or(format!("{text:?} is too long"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!("{text:?}: {digits} has no unit: {HINT}"));
    }
    if total == 0 {
        return Err(format!("{text:?}: a ban must last at least 1s: {HINT}"));
    }
    if total > pushd_wire::MAX_BAN_S {
        return Err(format!("{text:?}: a ban lasts at most {}d", pushd_wire::MAX_BAN_S / 86_400));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_combinations() {
        assert_eq!(parse_duration("30s"), Ok(30));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert_eq!(parse_duration(" 90s "), Ok(90));
        assert_eq!(parse_duration("3650d"), Ok(pushd_wire::MAX_BAN_S));
    }

    #[test]
    fn bans_longer_than_the_server_takes_are_refused() {
        assert!(parse_duration("3651d").unwrap_err().contains("at most 3650d"));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("213503982334601d").is_err(), "a product that overflows u64");
    }

    #[test]
    fn durations_without_a_unit_or_zero_are_refused() {
        assert!(parse_duration("30").unwrap_err().contains("has no unit"));
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("h").unwrap_err().contains("needs a number"));
        assert!(parse_duration("").unwrap_err().contains("at least 1s"));
        assert!(parse_duration("0s").unwrap_err().contains("at least 1s"));
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn server_must_be_plain_http() {
        assert!(parse_server("http://127.0.0.1:8080").is_ok());
        assert!(parse_server("https://x").unwrap_err().contains("https is not supported"));
        assert!(parse_server("127.0.0.1:8080").is_err());
    }

    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors_exit_2_and_defaults_hold() {
        let err = Cli::try_parse_from(["pushctl", "kick"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["pushctl", "kick", "n0.1", "--ban", "5m"]).unwrap_err();
        assert_eq!(err.exit_code(), 2, "--ban needs --user");
        let err = Cli::try_parse_from(["pushctl", "kick", "n0.1", "--user", "u"]).unwrap_err();
        assert_eq!(err.exit_code(), 2, "conn ids and --user conflict");

        let cli = Cli::try_parse_from(["pushctl", "stats", "--watch"]).unwrap();
        assert!(matches!(cli.command, Command::Stats { watch: Some(2) }));
        assert_eq!(cli.timeout, 3);
        let cli = Cli::try_parse_from(["pushctl", "--json", "kick", "--user", "u7", "--ban", "1m"]).unwrap();
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Kick { ban: Some(60), .. }));
    }
}

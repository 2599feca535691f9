//! `pushctl`, the operator CLI, against a real cluster: one real `redis-server`, three real `pushd`
//! processes (p0, p1, p2, admin key `adm`, node TTL 3 s) and the real `pushctl` binary. It reports
//! exactly what is connected where, in JSON and in tables that fit 80 columns; kicks every socket
//! of a user and no other, and a ban keeps the user out of every node; a dead node makes an answer
//! partial (exit 3, the node named) until the registry forgets it; auth and reachability failures
//! say what to do and exit 1; a publish lands in history and reaches subscribers.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use pushd_tests::backends::Backend;
use pushd_tests::*;
use serde_json::{Value, json};

/// The admin key every node of these tests is started with.
const KEY: &str = "adm";
/// Columns every table must fit.
const WIDTH: usize = 80;

/// Retries `probe` until it yields `Some`, under the test guard. Only for what changes on a
/// clock: the node registry is rewritten by a heartbeat every second and entries lapse by TTL,
/// and nothing announces either.
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut probe: impl FnMut() -> F) -> T {
    within(what, async {
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// `pushctl --server <node> --admin-key adm <args>`.
async fn ctl(node: &PushdProcess, args: &[&str]) -> CtlOutput {
    let server = node.url("");
    let mut all = vec!["--server", server.as_str(), "--admin-key", KEY];
    all.extend_from_slice(args);
    pushctl(&all, &[]).await
}

/// Asserts `out` exited `code` and returns its stdout parsed as JSON.
fn json_of(out: &CtlOutput, code: i32) -> Value {
    assert_eq!(out.code, code, "{out:#?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:#?}"))
}

/// Asserts `out` exited 0 with nothing on stderr and returns its stdout.
fn ok_text(out: CtlOutput) -> String {
    assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{out:#?}");
    out.stdout
}

/// Asserts every line of a table fits the terminal width pushctl promises.
fn assert_fits(text: &str) {
    for line in text.lines() {
        assert!(line.chars().count() <= WIDTH, "{} columns > {WIDTH}: {line:?}\nin:\n{text}", line.chars().count());
    }
}

/// The whitespace-separated cells of the table line whose first cell is `first`.
fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    let mut rows = text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).filter(|c| c.first() == Some(&first));
    let found = rows.next().unwrap_or_else(|| panic!("no row starting with {first:?} in:\n{text}"));
    assert!(rows.next().is_none(), "two rows start with {first:?} in:\n{text}");
    found
}

/// The ids listed by `pushctl --json nodes`, sorted.
async fn registered(node: &PushdProcess) -> Vec<String> {
    let answer = json_of(&ctl(node, &["--json", "nodes"]).await, 0);
    let mut ids: Vec<String> =
        answer["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids
}

/// Starts Redis and p0, p1, p2, and waits until the registry (asked through pushctl) lists all
/// three: a survey only waits for registered nodes, so answers are complete only from then on.
async fn cluster3() -> (Backend, Vec<PushdProcess>) {
    cluster3_on(Backend::single().await).await
}

/// `cluster3` on the Redis deployment `redis`.
async fn cluster3_on(redis: Backend) -> (Backend, Vec<PushdProcess>) {
    let reach = redis.args();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let id = format!("p{i}");
        let mut args: Vec<&str> = reach.iter().map(String::as_str).collect();
        args.extend(["--node-id", &id, "--admin-key", KEY, "--node-ttl", "3"]);
        nodes.push(PushdProcess::start(&args).await);
    }
    // The first heartbeat registers each node; it runs on a 1 s clock, not on an event.
    eventually("p0, p1 and p2 in `pushctl nodes`", || async {
        (registered(&nodes[0]).await == ["p0", "p1", "p2"]).then_some(())
    })
    .await;
    (redis, nodes)
}

/// Opens `/ws?user=<user>` on `node` and subscribes to `channels`.
async fn client(node: &PushdProcess, user: &str, channels: &[String]) -> WsClient {
    let mut c = node.ws(&format!("user={user}")).await;
    assert_eq!(c.welcome["user"], user, "{}", c.welcome);
    for ch in channels {
        let reply = c.subscribe(ch, None).await;
        assert_eq!(reply["ok"], true, "{user} subscribing to {ch}: {reply}");
    }
    c
}

/// How many clients the survey tests connect, laid out by `plan`.
const PLANNED: usize = 60;

/// Client `i` of the `PLANNED` 60 of the survey tests: on node `p(i % 3)` (20 each), user
/// `u(i % 40)` (so u0..u19 have two sockets on two different nodes, as 40 is not a multiple of 3,
/// and u20..u39 one), subscribed to `room:(i % 5)`, plus `news` when `i % 4 == 0` (15 subscribers
/// on every node) and `lobby` when `i % 6 == 0` (10 subscribers, all on p0).
fn plan(i: usize) -> (usize, String, Vec<String>) {
    let mut channels = vec![format!("room:{}", i % 5)];
    if i.is_multiple_of(4) {
        channels.push("news".into());
    }
    if i.is_multiple_of(6) {
        channels.push("lobby".into());
    }
    (i % 3, format!("u{}", i % 40), channels)
}

/// What the plan adds up to, per node and per channel.
struct Expected {
    /// Subscriptions on p0, p1 and p2.
    subs_per_node: [u64; 3],
    /// The distinct channels subscribed to on p0, p1 and p2.
    channels_per_node: [BTreeSet<String>; 3],
    /// Per channel: its subscribers, and the nodes they are on.
    per_channel: BTreeMap<String, (u64, BTreeSet<usize>)>,
}

fn expected() -> Expected {
    let mut subs_per_node = [0u64; 3];
    let mut channels_per_node: [BTreeSet<String>; 3] = Default::default();
    let mut per_channel: BTreeMap<String, (u64, BTreeSet<usize>)> = BTreeMap::new();
    for i in 0..PLANNED {
        let (n, _, channels) = plan(i);
        subs_per_node[n] += channels.len() as u64;
        for ch in channels {
            channels_per_node[n].insert(ch.clone());
            let entry = per_channel.entry(ch).or_default();
            entry.0 += 1;
            entry.1.insert(n);
        }
    }
    Expected { subs_per_node, channels_per_node, per_channel }
}

/// What `rooms` must list, in its order (most subscribers first): channel, subscribers, nodes.
fn expected_rooms() -> Vec<(String, u64, u64)> {
    let per_channel = expected().per_channel;
    ["news", "room:0", "room:1", "room:2", "room:3", "room:4", "lobby"]
        .iter()
        .map(|ch| (ch.to_string(), per_channel[*ch].0, per_channel[*ch].1.len() as u64))
        .collect()
}

/// `cluster3` with the `PLANNED` clients of `plan` connected and subscribed, each welcomed by
/// its node. Dropped in field order: the clients, then the nodes, then Redis.
struct Surveyed {
    clients: Vec<WsClient>,
    nodes: Vec<PushdProcess>,
    _redis: Backend,
}

impl Surveyed {
    async fn start() -> Self {
        Self::start_on(Backend::single().await).await
    }

    async fn start_on(backend: Backend) -> Self {
        let (redis, nodes) = cluster3_on(backend).await;
        let mut clients = Vec::new();
        for i in 0..PLANNED {
            let (n, user, channels) = plan(i);
            let c = client(&nodes[n], &user, &channels).await;
            assert_eq!(c.welcome["node"], format!("p{n}"), "{}", c.welcome);
            clients.push(c);
        }
        Self { clients, nodes, _redis: redis }
    }

    /// The connection id client `i` of the plan was welcomed with.
    fn conn(&self, i: usize) -> String {
        self.clients[i].welcome["conn"].as_str().unwrap().to_owned()
    }
}

/// The survey tests below count on these numbers; a change to `plan` that breaks them fails here
/// first, without a cluster.
#[test]
fn the_survey_plan_puts_85_subscriptions_on_7_channels_with_news_largest_and_lobby_on_p0_alone() {
    let e = expected();
    assert_eq!(e.subs_per_node, [35, 25, 25]);
    assert_eq!(e.channels_per_node.iter().map(BTreeSet::len).collect::<Vec<_>>(), [7, 6, 6]);
    let want = expected_rooms();
    assert_eq!(want[0], ("news".into(), 15, 3));
    assert_eq!(want[1], ("room:0".into(), 12, 3));
    assert_eq!(want[6], ("lobby".into(), 10, 1));
}

#[tokio::test]
async fn stats_json_counts_exactly_what_is_connected_per_node_and_in_total_and_any_node_answers() {
    stats_json_counts(Backend::single().await).await;
}

#[tokio::test]
async fn stats_json_counts_the_same_on_a_redis_cluster_with_its_sharded_channels() {
    stats_json_counts(Backend::cluster().await).await;
}

async fn stats_json_counts(backend: Backend) {
    let s = Surveyed::start_on(backend).await;
    let (nodes, e) = (&s.nodes, expected());

    // stats --json: totals with unique users and channels, one exact row per node.
    let stats = json_of(&ctl(&nodes[0], &["--json", "stats"]).await, 0);
    assert_eq!(stats["engine"], "redis", "{stats}");
    assert_eq!(stats["missing"], json!([]), "{stats}");
    // Redis' own count of node-level subscriptions: one per node for each channel it holds.
    let redis = &stats["redis"];
    assert!(redis["version"].as_str().is_some_and(|v| v.starts_with('7')), "{redis}");
    let top = &redis["top_channels"];
    assert_eq!((&top[0]["channel"], &top[0]["subscribers"]), (&json!("news"), &json!(3)), "{redis}");
    let lobby = top.as_array().unwrap().iter().find(|t| t["channel"] == "lobby");
    assert_eq!(lobby.map(|t| &t["subscribers"]), Some(&json!(1)), "{redis}");
    let totals = &stats["totals"];
    assert_eq!(
        [&totals["nodes"], &totals["connections"], &totals["users"], &totals["subscriptions"], &totals["channels"]],
        [&json!(3), &json!(60), &json!(40), &json!(85), &json!(7)],
        "totals: {totals}"
    );
    let rows = stats["nodes"].as_array().unwrap();
    assert_eq!(rows.iter().map(|n| n["id"].as_str().unwrap()).collect::<Vec<_>>(), ["p0", "p1", "p2"], "{stats}");
    for (n, row) in rows.iter().enumerate() {
        assert_eq!(row["addr"], nodes[n].addr.to_string(), "{row}");
        assert_eq!(row["connections"], 20, "{row}");
        assert_eq!(row["users"], 20, "every node holds one socket of 20 different users: {row}");
        assert_eq!(row["subscriptions"], e.subs_per_node[n], "{row}");
        assert_eq!(row["channels"], e.channels_per_node[n].len(), "{row}");
        assert_eq!(row["draining"], false, "{row}");
    }
    // Any node answers for the whole cluster.
    let from_p2 = json_of(&ctl(&nodes[2], &["--json", "stats"]).await, 0);
    assert_eq!(from_p2["totals"]["connections"], 60, "{from_p2}");
    assert_eq!(from_p2["totals"]["users"], 40, "{from_p2}");
}

#[tokio::test]
async fn stats_table_fits_80_columns_and_shows_the_cluster_totals_and_each_nodes_counts() {
    let s = Surveyed::start().await;
    let (nodes, e) = (&s.nodes, expected());

    let text = ok_text(ctl(&nodes[1], &["stats"]).await);
    assert_fits(&text);
    assert!(text.starts_with("engine redis · 3 nodes · up "), "{text}");
    assert!(text.contains("\n60 connections · 40 users · 85 subscriptions · 7 channels\n"), "{text}");
    for (n, node) in nodes.iter().enumerate() {
        let cells = row(&text, &format!("p{n}"));
        let addr = node.addr.to_string();
        let (conns, subs, chans) =
            ("20".to_owned(), e.subs_per_node[n].to_string(), e.channels_per_node[n].len().to_string());
        // NODE ADDR UP CONNS SUBS CHANS IN/S OUT/S
        assert_eq!((cells[1], cells[3], cells[4], cells[5]), (addr.as_str(), &*conns, &*subs, &*chans), "{text}");
    }
}

#[tokio::test]
async fn nodes_table_fits_80_columns_and_lists_every_registered_node_with_its_address_serving() {
    let s = Surveyed::start().await;
    let nodes = &s.nodes;

    // nodes as a table: the registry, every node with its address.
    let text = ok_text(ctl(&nodes[2], &["nodes"]).await);
    assert_fits(&text);
    assert_eq!(text.lines().count(), 4, "a header and three nodes:\n{text}");
    // The registry's counters are as of each node's last heartbeat, so only who and where here.
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(&header[..4], ["NODE", "ADDR", "VERSION", "UP"], "{text}");
    for (n, node) in nodes.iter().enumerate() {
        let cells = row(&text, &format!("p{n}"));
        assert_eq!(cells[1], node.addr.to_string(), "{text}");
        assert!(cells[3].ends_with('s'), "UP is a duration like 3s: {text}");
        assert_eq!(cells.last(), Some(&"serving"), "{text}");
    }
}

#[tokio::test]
async fn rooms_json_lists_every_channel_with_its_subscribers_and_nodes_most_first_and_obeys_pattern_and_limit() {
    let s = Surveyed::start().await;
    let nodes = &s.nodes;

    // rooms --json: every channel with its exact subscribers and nodes, most subscribers first.
    let rooms = json_of(&ctl(&nodes[0], &["--json", "rooms"]).await, 0);
    assert_eq!((&rooms["missing"], &rooms["truncated"]), (&json!([]), &json!(false)), "{rooms}");
    let got: Vec<(String, u64, u64)> = rooms["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap().to_owned(),
                c["subscribers"].as_u64().unwrap(),
                c["nodes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected_rooms(), "{rooms}");
    // --pattern and --limit reach the server.
    let some = json_of(&ctl(&nodes[0], &["--json", "rooms", "--pattern", "room:*", "--limit", "2"]).await, 0);
    assert_eq!(some["channels"].as_array().unwrap().len(), 2, "{some}");
    assert_eq!((&some["channels"][0]["channel"], &some["truncated"]), (&json!("room:0"), &json!(true)), "{some}");
}

#[tokio::test]
async fn rooms_table_fits_80_columns_with_one_line_per_channel_and_its_subscribers_and_nodes() {
    let s = Surveyed::start().await;
    let (nodes, want) = (&s.nodes, expected_rooms());

    let text = ok_text(ctl(&nodes[0], &["rooms"]).await);
    assert_fits(&text);
    assert!(text.lines().next().unwrap().starts_with("CHANNEL"), "{text}");
    for (ch, subscribers, node_count) in &want {
        let cells = row(&text, ch);
        assert_eq!((cells[1], cells[2]), (&*subscribers.to_string(), &*node_count.to_string()), "{ch}:\n{text}");
    }
    assert_eq!(text.lines().count(), 1 + want.len(), "a header and one line per channel:\n{text}");
}

#[tokio::test]
async fn room_lists_a_channels_subscribers_with_their_nodes_and_its_presence_in_json_and_as_a_table() {
    let s = Surveyed::start().await;
    let (nodes, conn_of) = (&s.nodes, |i: usize| s.conn(i));

    // room <ch>: lobby's 10 subscribers are all on p0, and presence lists them too.
    let lobby = json_of(&ctl(&nodes[1], &["--json", "room", "lobby"]).await, 0);
    let subscribers = lobby["subscribers"].as_array().unwrap();
    assert_eq!(subscribers.len(), 10, "{lobby}");
    assert!(subscribers.iter().all(|s| s["node"] == "p0"), "{lobby}");
    assert_eq!(lobby["presence"].as_array().map(Vec::len), Some(10), "{lobby}");
    let text = ok_text(ctl(&nodes[2], &["room", "lobby"]).await);
    assert_fits(&text);
    assert!(text.contains("\n10 subscribers\n") && text.contains("\npresence: 10 users\n"), "{text}");
    for i in (0..PLANNED).step_by(6) {
        assert!(text.lines().filter(|l| l.split_whitespace().any(|c| c == conn_of(i))).count() >= 1, "{text}");
    }
}

#[tokio::test]
async fn connections_of_a_user_are_exactly_its_sockets_on_every_node_in_json_and_as_a_table() {
    let s = Surveyed::start().await;
    let (nodes, conn_of) = (&s.nodes, |i: usize| s.conn(i));

    // connections --user u7: its two sockets, i = 7 on p1 and i = 47 on p2, sorted by node.
    let u7 = json_of(&ctl(&nodes[0], &["--json", "connections", "--user", "u7"]).await, 0);
    let want_u7 = json!([
        { "conn": conn_of(7), "user": "u7", "node": "p1", "transport": "ws", "channels": ["room:2"] },
        { "conn": conn_of(47), "user": "u7", "node": "p2", "transport": "ws", "channels": ["room:2"] },
    ]);
    let got_u7: Vec<Value> = u7["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let keep = ["conn", "user", "node", "transport", "channels"];
            Value::Object(keep.iter().map(|k| (k.to_string(), c[*k].clone())).collect())
        })
        .collect();
    assert_eq!(json!(got_u7), want_u7, "{u7}");
    assert_eq!((&u7["missing"], &u7["truncated"]), (&json!([]), &json!(false)), "{u7}");

    // As a table: u7's two rows.
    let text = ok_text(ctl(&nodes[0], &["connections", "--user", "u7"]).await);
    assert_fits(&text);
    assert_eq!(text.lines().count(), 3, "a header and two rows:\n{text}");
    for (i, node) in [(7, "p1"), (47, "p2")] {
        let cells = row(&text, &conn_of(i));
        // CONN USER NODE VIA ...
        assert_eq!((cells[1], cells[2], cells[3]), ("u7", node, "ws"), "{text}");
        assert!(cells.contains(&"room:2"), "{text}");
    }
}

#[tokio::test]
async fn connections_list_every_socket_with_its_user_node_and_channels_sorted_by_node_then_sequence() {
    let s = Surveyed::start().await;
    let (nodes, conn_of) = (&s.nodes, |i: usize| s.conn(i));

    // connections --json: all 60, each on its node with its user and channels.
    let all = json_of(&ctl(&nodes[2], &["--json", "connections"]).await, 0);
    let got: BTreeMap<String, (String, String, Vec<String>)> = all["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let channels = c["channels"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect();
            let s = |k: &str| c[k].as_str().unwrap().to_owned();
            (s("conn"), (s("user"), s("node"), channels))
        })
        .collect();
    let want_all: BTreeMap<String, (String, String, Vec<String>)> = (0..PLANNED)
        .map(|i| {
            let (n, user, mut channels) = plan(i);
            channels.sort();
            (conn_of(i), (user, format!("p{n}"), channels))
        })
        .collect();
    assert_eq!(got, want_all, "{all}");
    // Sorted by node, then by the connection's sequence number (p0.2 before p0.10).
    let order: Vec<&str> = all["connections"].as_array().unwrap().iter().map(|c| c["conn"].as_str().unwrap()).collect();
    let mut sorted = order.clone();
    sorted.sort_by_key(|c| {
        let (node, seq) = c.rsplit_once('.').unwrap();
        (node.to_owned(), seq.parse::<u64>().unwrap())
    });
    assert_eq!(order, sorted, "{all}");

    // As a table: all 60.
    let text = ok_text(ctl(&nodes[0], &["connections"]).await);
    assert_fits(&text);
    for i in 0..PLANNED {
        let (n, user, _) = plan(i);
        let cells = row(&text, &conn_of(i));
        assert_eq!((cells[1], cells[2]), (user.as_str(), format!("p{n}").as_str()), "{text}");
    }
}

#[tokio::test]
async fn connections_filters_by_node_and_channel_combine_and_a_limit_truncates() {
    let s = Surveyed::start().await;
    let (nodes, conn_of) = (&s.nodes, |i: usize| s.conn(i));

    // The filters combine: news subscribers on p1 are i = 4, 16, 28, 40, 52.
    let filtered = json_of(&ctl(&nodes[0], &["--json", "connections", "--node", "p1", "--channel", "news"]).await, 0);
    let conns: BTreeSet<&str> =
        filtered["connections"].as_array().unwrap().iter().map(|c| c["conn"].as_str().unwrap()).collect();
    let want_conns: Vec<String> = [4, 16, 28, 40, 52].into_iter().map(conn_of).collect();
    assert_eq!(conns, want_conns.iter().map(String::as_str).collect(), "{filtered}");
    let limited = json_of(&ctl(&nodes[0], &["--json", "connections", "--limit", "10"]).await, 0);
    assert_eq!(
        (limited["connections"].as_array().unwrap().len(), &limited["truncated"]),
        (10, &json!(true)),
        "{limited}"
    );
}

#[tokio::test]
async fn kick_closes_every_socket_of_the_user_and_no_other_and_a_ban_keeps_it_out_of_every_node() {
    kick_and_ban(Backend::single().await).await;
}

#[tokio::test]
async fn kick_and_ban_work_the_same_on_a_redis_cluster() {
    kick_and_ban(Backend::cluster().await).await;
}

async fn kick_and_ban(backend: Backend) {
    let (_redis, nodes) = cluster3_on(backend).await;
    let room = ["room:1".to_owned()];
    // u7 on p0 and p1; on the same nodes u8 and u77 (a user whose id starts with u7); u9 on p2.
    let mut u7_p0 = client(&nodes[0], "u7", &room).await;
    let mut u7_p1 = client(&nodes[1], "u7", &room).await;
    let mut u8 = client(&nodes[0], "u8", &room).await;
    let mut u77 = client(&nodes[1], "u77", &room).await;
    let mut u9 = client(&nodes[2], "u9", &room).await;

    let out = ctl(&nodes[2], &["kick", "--user", "u7"]).await;
    let text = ok_text(out);
    assert_fits(&text);
    assert!(text.starts_with("closed 2 sockets\n"), "{text}");
    assert_eq!(row(&text, "p0")[1], "1", "{text}");
    assert_eq!(row(&text, "p1")[1], "1", "{text}");
    assert!(!text.lines().any(|l| l.starts_with("p2")), "p2 closed nothing and is not listed:\n{text}");
    assert!(!text.contains("banned"), "{text}");
    for (c, on) in [(&mut u7_p0, "p0"), (&mut u7_p1, "p1")] {
        let closed = c.closed().await;
        assert_eq!(closed.code, 4009, "u7 on {on}: {closed:?}");
        assert_eq!(closed.reason, "kicked by an operator", "u7 on {on}: {closed:?}");
        // Answer the close as a browser does, so the node is done with the socket (see
        // `a_kicked_socket_whose_client_ignores_the_close_is_gone_at_once` for one that isn't).
        c.finish_close().await;
    }

    // Everyone else is still connected: a message published afterwards reaches all of them.
    let published = ok_text(ctl(&nodes[0], &["publish", "room:1", r#"{"after":"kick"}"#]).await);
    assert!(published.starts_with("published to room:1 at offset 1 "), "{published}");
    for (name, c) in [("u8 on p0", &mut u8), ("u77 on p1", &mut u77), ("u9 on p2", &mut u9)] {
        let m = c.messages(1).await.remove(0);
        assert_eq!(
            (&m["channel"], &m["offset"], &m["data"]),
            (&json!("room:1"), &json!(1), &json!({ "after": "kick" })),
            "{name}: {m}"
        );
    }
    let left = json_of(&ctl(&nodes[1], &["--json", "connections", "--user", "u8"]).await, 0);
    assert_eq!(left["connections"].as_array().unwrap().len(), 1, "{left}");
    let left = json_of(&ctl(&nodes[1], &["--json", "connections", "--user", "u77"]).await, 0);
    assert_eq!(left["connections"].as_array().unwrap().len(), 1, "{left}");

    // Without --ban, u7 may come straight back; with it, the kick closes that socket too (with
    // the given reason) and no node lets u7 in again.
    let mut u7_p2 = client(&nodes[2], "u7", &room).await;
    let out = ctl(&nodes[0], &["--json", "kick", "--user", "u7", "--ban", "1m", "--reason", "spam"]).await;
    let kicked = json_of(&out, 0);
    assert_eq!(kicked["total"], 1, "{kicked}");
    assert_eq!(kicked["missing"], json!([]), "{kicked}");
    let closed: BTreeMap<&str, u64> = kicked["closed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["node"].as_str().unwrap(), c["count"].as_u64().unwrap()))
        .filter(|(_, count)| *count > 0)
        .collect();
    assert_eq!(closed, BTreeMap::from([("p2", 1)]), "{kicked}");
    let until = kicked["banned_until_ms"].as_u64().unwrap_or_else(|| panic!("no banned_until_ms: {kicked}"));
    let now_ms = now_s() as u64 * 1000;
    assert!((now_ms + 55_000..=now_ms + 62_000).contains(&until), "a 1m ban from {now_ms} ends at {until}");
    assert_eq!(u7_p2.closed().await, Closed { code: 4009, reason: "spam".into() });
    u7_p2.finish_close().await;

    for node in &nodes {
        let mut again = WsClient::connect(node.addr, "user=u7").await;
        let refused = again.closed().await;
        assert_eq!(refused.code, 4003, "u7 reconnecting to {}: {refused:?}", node.addr);
        assert!(refused.reason.contains("banned"), "{refused:?}");
        let mut sse = SseClient::open(node.addr, "/sse?channel=room:1&user=u7", None).await;
        assert_eq!(sse.status, 403, "u7 over SSE to {}", node.addr);
        let body = sse.body_json().await;
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("banned"), "{body}");
        // The ban is u7's alone.
        let other = node.ws("user=u70").await;
        assert_eq!(other.welcome["user"], "u70");
    }
    // The table form of a ban says until when.
    let text = ok_text(ctl(&nodes[1], &["kick", "--user", "u7", "--ban", "2m"]).await);
    assert_fits(&text);
    assert!(text.starts_with("closed 0 sockets"), "{text}");
    assert!(text.contains("banned until ") && text.contains(" UTC (in "), "{text}");

    // Kicking by connection id closes exactly those sockets, wherever they are.
    let (c77, c9) = (u77.welcome["conn"].as_str().unwrap().to_owned(), u9.welcome["conn"].as_str().unwrap().to_owned());
    let text = ok_text(ctl(&nodes[0], &["kick", &c77, &c9]).await);
    assert!(text.starts_with("closed 2 sockets\n"), "{text}");
    assert_eq!((row(&text, "p1")[1], row(&text, "p2")[1]), ("1", "1"), "{text}");
    for c in [&mut u77, &mut u9] {
        assert_eq!(c.closed().await.code, 4009);
        c.finish_close().await;
    }
    ok_text(ctl(&nodes[2], &["publish", "room:1", "2"]).await);
    assert_eq!(u8.messages(1).await[0]["data"], 2);
}

/// A kicked socket is gone for operators at once, even when its client never answers the close
/// frame (a client kicked for abuse may well not): not listed, not counted, and not reported as
/// closed again by the next kick. The node may wait for the close handshake; it should not keep
/// presenting the socket as open meanwhile.
#[tokio::test]
async fn a_kicked_socket_whose_client_ignores_the_close_is_gone_at_once() {
    let (_redis, nodes) = cluster3().await;
    let mut u7 = client(&nodes[0], "u7", &["room:1".to_owned()]).await;
    let _u8 = client(&nodes[0], "u8", &["room:1".to_owned()]).await;
    let kicked = json_of(&ctl(&nodes[1], &["--json", "kick", "--user", "u7"]).await, 0);
    assert_eq!(kicked["total"], 1, "{kicked}");
    // u7 reads the close frame and stops reading: its close reply is never sent.
    assert_eq!(u7.closed().await.code, 4009);

    let (listed, stats, again) = tokio::join!(
        ctl(&nodes[1], &["--json", "connections", "--user", "u7"]),
        ctl(&nodes[2], &["--json", "stats"]),
        ctl(&nodes[2], &["--json", "kick", "--user", "u7"]),
    );
    let (listed, stats, again) = (json_of(&listed, 0), json_of(&stats, 0), json_of(&again, 0));
    let seen = json!({
        "u7 listed": listed["connections"].as_array().unwrap().len(),
        "connections counted": stats["totals"]["connections"],
        "closed by a second kick": again["total"],
    });
    let want = json!({ "u7 listed": 0, "connections counted": 1, "closed by a second kick": 0 });
    assert_eq!(seen, want, "right after the kick:\n{listed}\n{stats}\n{again}");
}

#[tokio::test]
async fn a_node_killed_hard_makes_stats_partial_and_named_until_the_registry_forgets_it() {
    let (_redis, mut nodes) = cluster3().await;
    let _a = client(&nodes[0], "a", &["room:1".to_owned()]).await;
    let _b = client(&nodes[1], "b", &["room:1".to_owned()]).await;
    let _c = client(&nodes[2], "c", &["room:1".to_owned()]).await;

    nodes[2].kill().await;
    // p2 stays registered for 2 to 3 s (its TTL after its last heartbeat): surveys meanwhile wait
    // for it and give up after --timeout minus half a second. The three run at once, well
    // inside that window.
    let started = Instant::now();
    let (table, stats, rooms) = tokio::join!(
        ctl(&nodes[0], &["--timeout", "1", "stats"]),
        ctl(&nodes[1], &["--timeout", "1", "--json", "stats"]),
        ctl(&nodes[0], &["--timeout", "1", "--json", "rooms"]),
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "answered after {took:?} with --timeout 1");

    assert_eq!(table.code, 3, "{table:#?}");
    assert!(table.stderr.contains("partial") && table.stderr.contains("p2"), "the warning names p2: {table:#?}");
    assert!(table.stdout.contains(" · 2 nodes · "), "{table:#?}");
    assert_fits(&table.stdout);
    row(&table.stdout, "p0");
    row(&table.stdout, "p1");
    assert!(!table.stdout.lines().any(|l| l.starts_with("p2 ")), "{table:#?}");

    let json = json_of(&stats, 3);
    assert_eq!(json["missing"], json!(["p2"]), "{json}");
    assert_eq!((&json["totals"]["nodes"], &json["totals"]["connections"]), (&json!(2), &json!(2)), "{json}");
    assert!(stats.stderr.contains("p2"), "{stats:#?}");
    // Other surveys are partial the same way.
    let json = json_of(&rooms, 3);
    assert_eq!(json["missing"], json!(["p2"]), "{json}");
    assert_eq!(json["channels"][0]["subscribers"], 2, "{json}");

    // No goodbye from p2: its registry entry lapses 3 s after its last heartbeat, on a clock.
    eventually("p2 to lapse from the registry", || async {
        (registered(&nodes[0]).await == ["p0", "p1"]).then_some(())
    })
    .await;
    let stats = json_of(&ctl(&nodes[0], &["--timeout", "2", "--json", "stats"]).await, 0);
    assert_eq!(stats["missing"], json!([]), "{stats}");
    assert_eq!(stats["totals"]["nodes"], 2, "{stats}");
    let out = ctl(&nodes[1], &["--timeout", "2", "stats"]).await;
    let text = ok_text(out);
    assert!(text.contains(" · 2 nodes · "), "{text}");
}

#[tokio::test]
async fn a_missing_or_wrong_admin_key_or_no_server_fails_with_exit_1_and_says_what_to_do() {
    let (_redis, nodes) = cluster3().await;
    let server = nodes[0].url("");

    // No key at all (neither --admin-key nor PUSHD_ADMIN_KEY).
    let out = pushctl(&["--server", &server, "stats"], &[]).await;
    assert_eq!((out.code, out.stdout.as_str()), (1, ""), "{out:#?}");
    assert!(out.stderr.contains("401") && out.stderr.contains("missing admin key"), "{out:#?}");
    assert!(out.stderr.contains("--admin-key") && out.stderr.contains("PUSHD_ADMIN_KEY"), "{out:#?}");
    // A wrong key.
    let out = pushctl(&["--server", &server, "--admin-key", "nope", "--json", "stats"], &[]).await;
    assert_eq!((out.code, out.stdout.as_str()), (1, ""), "{out:#?}");
    assert!(out.stderr.contains("wrong admin key") && out.stderr.contains("--admin-key"), "{out:#?}");
    // The key and the server from the environment work.
    let out = pushctl(&["--json", "nodes"], &[("PUSHCTL_SERVER", server.as_str()), ("PUSHD_ADMIN_KEY", KEY)]).await;
    assert_eq!(json_of(&out, 0)["nodes"].as_array().unwrap().len(), 3, "{out:#?}");
    let out = pushctl(&["--json", "nodes"], &[("PUSHCTL_SERVER", server.as_str()), ("PUSHD_ADMIN_KEY", "nope")]).await;
    assert_eq!(out.code, 1, "{out:#?}");

    // The API itself: 401 with the error body, without or with a wrong key.
    let (status, body) = nodes[0].api_get("/admin/stats").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let resp =
        within("GET /admin/stats", reqwest::Client::new().get(nodes[1].url("/admin/stats")).bearer_auth("nope").send())
            .await
            .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");

    // Nothing listens on the port: say so, and point at --server.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nowhere = format!("http://127.0.0.1:{port}");
    let out = pushctl(&["--server", &nowhere, "--admin-key", KEY, "stats"], &[]).await;
    assert_eq!((out.code, out.stdout.as_str()), (1, ""), "{out:#?}");
    assert!(out.stderr.contains(&nowhere), "{out:#?}");
    assert!(out.stderr.contains("--server"), "{out:#?}");

    // Something accepts but never answers: --timeout bounds the wait, and the message says so.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let started = Instant::now();
    let out = pushctl(&["--server", &silent_url, "--admin-key", KEY, "--timeout", "1", "stats"], &[]).await;
    let took = started.elapsed();
    assert_eq!((out.code, out.stdout.as_str()), (1, ""), "{out:#?}");
    assert!(out.stderr.contains("within 1s") && out.stderr.contains("--timeout"), "{out:#?}");
    assert!(took < Duration::from_secs(2), "gave up after {took:?} with --timeout 1");
    hold.abort();

    // Bad usage is clap's exit 2.
    let out = pushctl(&["--server", &server, "--admin-key", KEY, "kick"], &[]).await;
    assert_eq!(out.code, 2, "{out:#?}");
    let out = pushctl(&["--server", &server, "--admin-key", KEY, "kick", "--ban", "1m", "p0.1"], &[]).await;
    assert_eq!(out.code, 2, "{out:#?}");
}

#[tokio::test]
async fn publish_reaches_subscribers_on_other_nodes_and_shows_in_history() {
    let (_redis, nodes) = cluster3().await;
    let mut sub = nodes[1].ws("user=u1").await;
    let reply = sub.subscribe("room:1", None).await;
    assert_eq!((&reply["ok"], &reply["offset"]), (&json!(true), &json!(0)), "{reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_owned();

    let text = ok_text(ctl(&nodes[0], &["publish", "room:1", r#"{"a":1}"#]).await);
    assert_eq!(text, format!("published to room:1 at offset 1 (epoch {epoch})\n"));
    let m = sub.messages(1).await.remove(0);
    assert_eq!((&m["channel"], &m["offset"], &m["data"]), (&json!("room:1"), &json!(1), &json!({ "a": 1 })), "{m}");

    let history = json_of(&ctl(&nodes[2], &["--json", "history", "room:1"]).await, 0);
    assert_eq!(
        (&history["channel"], &history["epoch"], &history["top"]),
        (&json!("room:1"), &json!(epoch), &json!(1)),
        "{history}"
    );
    let publications = history["publications"].as_array().unwrap();
    assert_eq!(publications.len(), 1, "{history}");
    assert_eq!((&publications[0]["offset"], &publications[0]["data"]), (&json!(1), &json!({ "a": 1 })), "{history}");

    let text = ok_text(ctl(&nodes[1], &["history", "room:1"]).await);
    assert_fits(&text);
    assert!(text.starts_with(&format!("room:1 · epoch {epoch} · top 1 · 1 message\n")), "{text}");
    let cells = row(&text, "1");
    assert_eq!(cells.last(), Some(&r#"{"a":1}"#), "{text}");

    // More messages: --event reaches the subscriber, --since and --limit page the history, and
    // rooms shows how much history the channel keeps.
    ok_text(ctl(&nodes[1], &["publish", "room:1", r#""two""#, "--event", "chat"]).await);
    ok_text(ctl(&nodes[2], &["publish", "room:1", "3"]).await);
    let m = sub.messages(2).await;
    assert_eq!((&m[0]["offset"], &m[0]["event"], &m[0]["data"]), (&json!(2), &json!("chat"), &json!("two")), "{m:?}");
    assert_eq!((&m[1]["offset"], &m[1]["data"]), (&json!(3), &json!(3)), "{m:?}");
    let page = json_of(&ctl(&nodes[0], &["--json", "history", "room:1", "--since", "1", "--limit", "1"]).await, 0);
    let offsets: Vec<&Value> = page["publications"].as_array().unwrap().iter().map(|p| &p["offset"]).collect();
    assert_eq!(offsets, [&json!(2)], "{page}");
    assert_eq!(page["publications"][0]["event"], "chat", "{page}");
    let rooms = json_of(&ctl(&nodes[0], &["--json", "rooms"]).await, 0);
    let room1 = &rooms["channels"][0];
    let keep = ["channel", "subscribers", "history_len", "last_offset"];
    let room1 = Value::Object(keep.iter().map(|k| (k.to_string(), room1[*k].clone())).collect());
    assert_eq!(room1, json!({ "channel": "room:1", "subscribers": 1, "history_len": 3, "last_offset": 3 }), "{rooms}");

    // A payload that is not JSON is refused locally, with exit 1, and nothing is published.
    let out = ctl(&nodes[0], &["publish", "room:1", "hello"]).await;
    assert_eq!((out.code, out.stdout.as_str()), (1, ""), "{out:#?}");
    assert!(out.stderr.contains("not valid JSON"), "{out:#?}");
    let history = json_of(&ctl(&nodes[0], &["--json", "history", "room:1"]).await, 0);
    assert_eq!(history["top"], 3, "{history}");
    assert_eq!(sub.command(json!({ "op": "ping" })).await["ok"], true);
    assert!(sub.pending_is_empty(), "nothing more reached the subscriber");
}

#[tokio::test]
async fn unban_lets_a_banned_user_back_in_on_every_node() {
    let (_redis, nodes) = cluster3().await;
    ok_text(ctl(&nodes[0], &["kick", "--user", "u7", "--ban", "1h"]).await);
    let mut refused = WsClient::connect(nodes[1].addr, "user=u7").await;
    assert_eq!(refused.closed().await.code, 4003, "banned");
    let text = ok_text(ctl(&nodes[2], &["unban", "u7"]).await);
    assert_eq!(text.trim(), "unbanned u7: every node lets them in again");
    for node in &nodes {
        assert_eq!(node.ws("user=u7").await.welcome["user"], "u7");
    }
    let again = json_of(&ctl(&nodes[0], &["--json", "unban", "u7"]).await, 0);
    assert_eq!(again, json!({ "user": "u7", "was_banned": false }));
}

/// Whether `node` refuses `user` as banned (4003) or lets them in (welcome).
async fn refused_as_banned(node: &PushdProcess, user: &str) -> bool {
    let mut c = WsClient::connect(node.addr, &format!("user={user}")).await;
    match c.next_or_closed().await {
        Ok(welcome) => {
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            false
        }
        Err(closed) => {
            assert_eq!(closed.code, 4003, "{closed:?}");
            true
        }
    }
}

/// Each node keeps a copy of the bans, so that letting a user in costs no round trip to Redis,
/// and loads it when it starts and whenever its pub/sub connection comes back (announcements
/// sent while it was away are lost, the stored bans are not).
#[tokio::test]
async fn a_node_loads_the_bans_when_it_starts_and_when_its_pubsub_connection_comes_back() {
    let (redis, nodes) = cluster3().await;
    ok_text(ctl(&nodes[0], &["kick", "--user", "u7", "--ban", "1h"]).await);
    let mut args: Vec<String> = redis.args();
    args.extend(["--node-id", "p3", "--admin-key", KEY].map(String::from));
    let late = PushdProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(refused_as_banned(&late, "u7").await, "a node started after the ban refuses u7");

    // A ban stored without its announcement, as if every node had missed it: the copies do
    // not have it, and a copy that says "not banned" is taken without asking Redis ...
    let until = ((now_s() as u64) + 3600) * 1000;
    redis.cli_key(&["HSET", "pushd:bans", "u8", &until.to_string()]).await;
    for node in nodes.iter().chain([&late]) {
        assert!(!refused_as_banned(node, "u8").await, "the copy of {} has no ban of u8 yet", node.addr);
    }
    // ... until the pub/sub connections come back and every node loads the bans again.
    redis.cli_all(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    for node in nodes.iter().chain([&late]) {
        eventually("u8 refused once the node loaded the bans again", || async {
            refused_as_banned(node, "u8").await.then_some(())
        })
        .await;
        assert!(refused_as_banned(node, "u7").await, "u7 is still banned after the reload");
    }
    // An unban answered is in effect everywhere at once: a copy that says "banned" is checked.
    ok_text(ctl(&nodes[1], &["unban", "u8"]).await);
    for node in nodes.iter().chain([&late]) {
        assert!(!refused_as_banned(node, "u8").await);
    }
}

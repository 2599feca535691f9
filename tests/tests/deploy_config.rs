//! The deployment files, checked by the tools that will read them: HAProxy's own parser with
//! warnings fatal, promtool for the Prometheus config, rules and rule unit tests, the Compose
//! Specification schema, and the dashboards' JSON against the provisioned datasource, Grafana's
//! grid and PromQL's parser. The live checks are in `load_balancer.rs` and `dashboards.rs`.

use std::collections::{BTreeSet, HashSet};

use pushd_tests::deploy::{Haproxy, dashboards, free_port, panel_queries, repo, run, tool};
use serde_json::Value;

/// What the provisioned datasource is called; every panel must name it by this uid.
const DATASOURCE_UID: &str = "prometheus";

#[tokio::test]
async fn haproxy_accepts_the_config_without_a_warning() {
    // Any address will do for the check; nothing is started.
    let fake = |port: u16| format!("127.0.0.1:{port}");
    let mut env = vec![
        ("HAPROXY_PUBLIC".to_owned(), fake(free_port())),
        ("HAPROXY_ADMIN".to_owned(), fake(free_port())),
        ("HAPROXY_STATS".to_owned(), fake(free_port())),
    ];
    for i in 1..=3 {
        env.push((format!("PUSHD_{i}"), fake(1000 + i)));
        env.push((format!("PUSHD_{i}_ADMIN"), fake(2000 + i)));
    }
    let config = Haproxy::config();
    let (ok, out) = run(&tool("haproxy"), &["-c", "-dW", "-f", config.to_str().unwrap()], &env).await;
    assert!(ok, "haproxy -c -dW rejected {}:\n{out}", config.display());
}

#[tokio::test]
async fn promtool_accepts_the_config_and_rules_and_the_rule_tests_pass() {
    let dir = repo().join("deploy/prometheus");
    let path = |file: &str| dir.join(file).to_string_lossy().into_owned();
    for args in [
        ["check", "config", &path("prometheus.yml")],
        ["check", "rules", &path("alerts.yml")],
        ["test", "rules", &path("alerts_test.yml")],
    ] {
        let (ok, out) = run(&tool("promtool"), &args, &[]).await;
        assert!(ok, "promtool {} failed:\n{out}", args.join(" "));
    }
}

#[tokio::test]
async fn every_alert_has_a_unit_test() {
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("deploy/prometheus/alerts_test.yml")).unwrap();
    let names: Vec<&str> = alerts.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        assert!(tests.contains(&format!("alertname: {name}")), "alert {name} has no test in alerts_test.yml");
    }
}

#[tokio::test]
async fn the_compose_file_follows_the_compose_specification() {
    let compose = repo().join("docker-compose.yml");
    let (ok, out) =
        run(&tool("check-jsonschema"), &["--builtin-schema", "vendor.compose-spec", compose.to_str().unwrap()], &[])
            .await;
    assert!(ok, "docker-compose.yml does not validate:\n{out}");
}

#[test]
fn compose_haproxy_and_prometheus_name_the_same_nodes() {
    let read = |path: &str| std::fs::read_to_string(repo().join(path)).unwrap();
    let compose: BTreeSet<String> = read("docker-compose.yml")
        .lines()
        .filter_map(|l| l.strip_prefix("  ").and_then(|l| l.strip_suffix(':')))
        .filter(|l| l.starts_with("pushd-"))
        .map(str::to_owned)
        .collect();
    let haproxy = read("deploy/haproxy/haproxy.cfg");
    let servers = |backend: &str| -> BTreeSet<String> {
        haproxy
            .split(&format!("\nbackend {backend}\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no backend {backend}"))
            .lines()
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.trim().strip_prefix("server "))
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    };
    let targets: BTreeSet<String> = read("deploy/prometheus/targets/pushd.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("node: "))
        .map(str::to_owned)
        .collect();
    assert_eq!(compose.len(), 3, "{compose:?}");
    assert_eq!(servers("pushd"), compose, "haproxy's public backend");
    assert_eq!(servers("pushd-admin"), compose, "haproxy's admin backend");
    assert_eq!(targets, compose, "prometheus targets");
}

#[tokio::test]
async fn the_dashboards_are_what_their_generator_makes() {
    let script = repo().join("grafana/dashboards.py");
    let (ok, out) = run(&tool("python3"), &[script.to_str().unwrap(), "--check"], &[]).await;
    assert!(ok, "grafana/dashboards/*.json differ from grafana/dashboards.py: {out}");
}

#[test]
fn dashboards_have_unique_ids_a_provisioned_datasource_and_a_valid_grid() {
    let provisioned = std::fs::read_to_string(repo().join("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert!(
        provisioned.lines().any(|l| l.trim() == format!("uid: {DATASOURCE_UID}")),
        "the provisioned datasource's uid is not {DATASOURCE_UID}"
    );
    let dashboards = dashboards();
    assert_eq!(dashboards.len(), 2, "the overview and the Redis dashboard");
    let mut uids = HashSet::new();
    for (file, text, dashboard) in &dashboards {
        assert!(!text.contains("${DS_"), "{file}: import placeholders break file provisioning");
        assert!(uids.insert(dashboard["uid"].as_str().unwrap().to_owned()), "{file}: dashboard uid used twice");
        let variable = &dashboard["templating"]["list"][0];
        assert_eq!((&variable["name"], &variable["includeAll"]), (&Value::from("node"), &Value::from(true)));
        let panels = dashboard["panels"].as_array().unwrap();
        let mut ids = HashSet::new();
        let mut cells = HashSet::new();
        for panel in panels {
            let title = panel["title"].as_str().unwrap();
            assert!(ids.insert(panel["id"].as_u64().expect("a numeric id")), "{file}: panel id of {title} used twice");
            let g = &panel["gridPos"];
            let (x, y, w, h) = (num(&g["x"]), num(&g["y"]), num(&g["w"]), num(&g["h"]));
            assert!(w > 0 && h > 0 && x + w <= 24, "{file}: {title} lies outside the 24-column grid: {g}");
            for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
                assert!(cells.insert(cell), "{file}: {title} overlaps another panel at {cell:?}");
            }
            if panel["type"] == "row" {
                continue;
            }
            assert!(
                panel["description"].as_str().is_some_and(|d| d.len() > 40),
                "{file}: {title} must say what to do when its line goes the wrong way"
            );
            assert_eq!(panel["datasource"]["uid"], DATASOURCE_UID, "{file}: {title}");
            for target in panel["targets"].as_array().unwrap() {
                assert_eq!(target["datasource"]["uid"], DATASOURCE_UID, "{file}: {title}");
                assert!(target["expr"].as_str().unwrap().contains("node=~\"$node\""), "{file}: {title} ignores $node");
            }
        }
    }
}

#[tokio::test]
async fn every_panel_query_is_valid_promql() {
    // promtool parses every expression of a rules file: each panel query becomes a recording rule.
    let mut rules = String::from("groups:\n  - name: panels\n    rules:\n");
    for (i, (_, _, expr)) in panel_queries().iter().enumerate() {
        rules.push_str(&format!("      - record: panel_{i}\n        expr: {}\n", serde_json::to_string(expr).unwrap()));
    }
    let path = std::env::temp_dir().join(format!("pushd-panels-{}-{}.yml", std::process::id(), free_port()));
    std::fs::write(&path, rules).unwrap();
    let (ok, out) = run(&tool("promtool"), &["check", "rules", path.to_str().unwrap()], &[]).await;
    let _ = std::fs::remove_file(&path);
    assert!(ok, "a panel query does not parse:\n{out}");
}

fn num(v: &Value) -> u64 {
    v.as_u64().expect("grid positions are non-negative integers")
}

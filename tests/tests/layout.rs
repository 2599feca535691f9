//! The server crate's house rules, read from its source: imports between top-level modules point
//! one way (no cycle), the doors named in docs/ARCHITECTURE.md hold, and the import graph that
//! page prints is the one the code has.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn server_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/src")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The crate's top-level modules (files and directories beside lib.rs) and their files.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            modules.insert(name, rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.insert(name, vec![path]);
        }
    }
    modules
}

/// The code of a file without its comments and without its unit tests (`#[cfg(test)]` onwards):
/// tests may reach anywhere.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap();
    text.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n")
}

/// The first path segment of every item in a `crate::…` path, including each item of a
/// `crate::{a::B, c}` group (nested groups belong to their first segment).
fn crate_imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item) = (0, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            found.insert(first_segment(&item));
        } else {
            found.insert(first_segment(rest));
        }
    }
    found.remove("");
    found
}

fn first_segment(path: &str) -> String {
    path.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

/// Which top-level module imports which.
fn graph() -> Graph {
    let modules = modules(&server_src());
    let mut graph = Graph::new();
    for (name, files) in &modules {
        let mut deps = BTreeSet::new();
        for file in files {
            let imports = crate_imports(&code(&std::fs::read_to_string(file).unwrap()));
            deps.extend(imports.into_iter().filter(|m| m != name && modules.contains_key(m)));
        }
        graph.insert(name.clone(), deps);
    }
    graph
}

/// The modules in an order where each comes after everything it imports; `Err` names the ones
/// left in or behind a cycle.
fn layers(graph: &Graph) -> Result<Vec<String>, Vec<String>> {
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut order = Vec::new();
    while done.len() < graph.len() {
        let ready: Vec<String> = graph
            .iter()
            .filter(|(m, deps)| !done.contains(*m) && deps.iter().all(|d| done.contains(d)))
            .map(|(m, _)| m.clone())
            .collect();
        if ready.is_empty() {
            return Err(graph.keys().filter(|m| !done.contains(*m)).cloned().collect());
        }
        done.extend(ready.iter().cloned());
        order.extend(ready);
    }
    Ok(order)
}

/// The graph as docs/ARCHITECTURE.md prints it: one `module -> imports` line each.
fn render(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(m, deps)| {
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            format!("{m:<12}-> {}", deps.join(" ")).trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn imports_between_server_modules_form_no_cycle() {
    let graph = graph();
    assert!(graph.len() > 10, "the server's modules were not found: {graph:?}");
    if let Err(stuck) = layers(&graph) {
        panic!("these modules import each other in a circle (or sit behind one): {stuck:?}\n{}", render(&graph));
    }
}

#[test]
fn the_doors_open_one_way() {
    let graph = graph();
    let above = |m: &str, forbidden: &[&str]| {
        let bad: Vec<&String> = graph[m].iter().filter(|d| forbidden.contains(&d.as_str())).collect();
        assert!(bad.is_empty(), "{m} must not import {bad:?}: it sits below them");
    };
    let front = ["listener", "router", "ws", "sse", "api", "http", "shutdown", "survey"];
    above("node", &[&front[..], &["session"]].concat());
    above("session", &front);
    above("hub", &[&front[..], &["session", "node"]].concat());
    above("engine", &[&front[..], &["session", "node", "hub", "protocol", "auth"]].concat());
    for leaf in ["metrics", "locks", "shard", "channel", "rate", "panics", "client_addr"] {
        assert!(graph[leaf].is_empty(), "{leaf} is a leaf, yet imports {:?}", graph[leaf]);
    }
}

#[test]
fn the_import_graph_in_the_architecture_page_is_the_codes() {
    let page = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ARCHITECTURE.md")).unwrap();
    let marker = "<!-- import graph: checked by tests/tests/layout.rs -->";
    let after = page.split_once(marker).expect("the page marks its import graph").1;
    let block = after.split("```").nth(1).expect("a code block follows the marker");
    let printed = block.trim_start_matches("text").trim();
    let actual = render(&graph());
    assert_eq!(printed, actual, "docs/ARCHITECTURE.md shows another import graph; print this one:\n{actual}");
}

#[test]
fn the_import_reader_sees_groups_paths_and_nothing_in_comments_or_tests() {
    let code = code(
        "use crate::hub::{Out, Transport};\nuse crate::{api, sse::{self, X}, ws};\n// crate::router\n\
         fn f() { crate::panics::count(); }\n#[cfg(test)]\nmod tests { use crate::node; }",
    );
    let found: Vec<String> = crate_imports(&code).into_iter().collect();
    assert_eq!(found, ["api", "hub", "panics", "sse", "ws"]);
}

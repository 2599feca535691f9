//! The browser files every node serves: the client module at `/client.js` (the same bytes as
//! `clients/js/pushd.js`, loadable from any page, revalidated by `ETag`) and the demo page at
//! `/demo`, which only a dev-mode node serves. The browser suite (`tests/browser/`) drives them
//! in Chromium.

use pushd::Config;
use pushd_tests::*;

fn source(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[tokio::test]
async fn every_node_serves_the_client_module_as_built_and_answers_304_to_its_etag() {
    for config in [Config::dev(), secure_config()] {
        let node = TestNode::start(config).await;
        let http = reqwest::Client::new();
        let resp =
            within("client.js", http.get(node.url("/client.js")).header("origin", "https://app.example.com").send())
                .await
                .unwrap();
        assert_eq!(resp.status(), 200);
        let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(header("content-type").as_deref(), Some("text/javascript; charset=utf-8"));
        assert_eq!(
            header("access-control-allow-origin").as_deref(),
            Some("*"),
            "a module from another origin needs it"
        );
        assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
        let etag = header("etag").expect("an ETag");
        assert_eq!(resp.text().await.unwrap(), source("clients/js/pushd.js"));

        let again = http.get(node.url("/client.js")).header("if-none-match", &etag).send().await.unwrap();
        assert_eq!((again.status().as_u16(), again.text().await.unwrap()), (304, String::new()));
        node.stop().await;
    }
}

#[tokio::test]
async fn the_demo_page_is_served_in_dev_mode_only() {
    let dev = TestNode::start(Config::dev()).await;
    let (status, page) = dev.api_get_text("/demo").await;
    assert_eq!(status, 200);
    assert_eq!(page, source("clients/js/demo/index.html"));
    assert!(page.contains("/client.js"), "the demo runs on the node's own client");
    dev.stop().await;

    let secure = TestNode::start(secure_config()).await;
    assert_eq!(secure.api_get("/demo").await.0, 404, "outside dev mode the demo is not served");
    secure.stop().await;
}

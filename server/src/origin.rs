//! The browser origin policy (`--allowed-origins`): which pages may open `/ws` and `/sse`, call
//! `/api/*`, and change anything through a POST.
//!
//! Requests without an `Origin` header are not from a browser page and are not refused here
//! (keys and tokens guard them). With one:
//! - an explicit list allows exactly its origins;
//! - the same-host default allows a page whose scheme, host and port are the request's own (the
//!   scheme from `X-Forwarded-Proto` behind a TLS-terminating proxy, else `http`). Same-host
//!   cannot tell a DNS-rebinding page from the real one, since both name the same host: in
//!   production give the explicit list;
//! - `*` allows any page, except that in dev mode a state-changing request (a POST to `/api/*`
//!   or `/admin/*`) must come from a loopback page, so a site the developer happens to visit
//!   cannot publish to or ban users on the node on their laptop.

use hyper::Request;
use hyper::header::{self, HeaderValue};

use crate::config::{Config, Origins};

/// Why an origin was refused (the request's answer says so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// The origin to echo in CORS headers (`None` without an `Origin`), or why it is refused.
/// `changes` is true for requests that change state (POSTs to the server and admin APIs).
pub fn check<B>(config: &Config, req: &Request<B>, changes: bool) -> Result<Option<HeaderValue>, Refused> {
    let Some(origin) = req.headers().get(header::ORIGIN) else { return Ok(None) };
    let text = origin.to_str().unwrap_or("");
    let ok = match &config.allowed_origins {
        Origins::List(list) => list.iter().any(|o| o == text),
        Origins::SameHost => same_host(text, req),
        Origins::Any if changes && config.dev_mode() => Site::parse(text).is_some_and(|s| s.is_loopback()),
        Origins::Any => true,
    };
    if ok {
        return Ok(Some(origin.clone()));
    }
    let hint = if changes && config.dev_mode() {
        "in dev mode only pages on loopback may change anything"
    } else {
        "add it to --allowed-origins (PUSHD_ALLOWED_ORIGINS)"
    };
    Err(Refused(format!("origin {text:?} is not allowed: {hint}")))
}

/// Whether the page at `origin` is this very host: same scheme, host and port.
fn same_host<B>(origin: &str, req: &Request<B>) -> bool {
    let scheme = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map_or("http", str::trim);
    let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    let (Some(page), Some(ours)) = (Site::parse(origin), Site::parse(&format!("{scheme}://{host}"))) else {
        return false;
    };
    page == ours
}

/// A web origin, `scheme://host[:port]`, with the port filled in from the scheme.
#[derive(Debug, PartialEq, Eq)]
struct Site {
    scheme: String,
    host: String,
    port: u16,
}

impl Site {
    /// Parses an origin; only `http` and `https` pages count.
    fn parse(text: &str) -> Option<Site> {
        let (scheme, rest) = text.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return None;
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, port.parse().ok()?),
            _ => (rest, default_port),
        };
        (!host.is_empty()).then(|| Site { scheme, host: host.to_ascii_lowercase(), port })
    }

    fn is_loopback(&self) -> bool {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, origin: &str, proto: Option<&str>) -> Request<()> {
        let mut r = Request::get("/ws").header("host", host).header("origin", origin);
        if let Some(p) = proto {
            r = r.header("x-forwarded-proto", p);
        }
        r.body(()).unwrap()
    }

    fn config(origins: Origins, dev: bool) -> Config {
        let token_secret = (!dev).then(|| "0123456789abcdef0123".to_owned());
        Config { allowed_origins: origins, token_secret, ..Config::dev() }
    }

    #[test]
    fn same_host_compares_scheme_host_and_port() {
        let c = config(Origins::SameHost, false);
        let ok = |host, origin, proto| check(&c, &req(host, origin, proto), false).is_ok();
        assert!(ok("push.example.com:8080", "http://push.example.com:8080", None));
        assert!(ok("Push.Example.com", "http://push.example.com:80", None), "default ports, any case");
        assert!(ok("push.example.com", "https://push.example.com", Some("https")), "behind a TLS proxy");
        assert!(!ok("push.example.com", "https://push.example.com", None), "the scheme must match");
        assert!(!ok("push.example.com:8080", "ftp://push.example.com:8080", None));
        assert!(!ok("push.example.com:8080", "http://push.example.com", None), "the port must match");
        assert!(!ok("push.example.com:8080", "http://push.example.com:8080/path", None));
        assert!(!ok("push.example.com:8080", "null", None));
    }

    #[test]
    fn in_dev_mode_only_loopback_pages_may_change_anything() {
        let dev = config(Origins::Any, true);
        let changes = |origin| check(&dev, &req("127.0.0.1:8080", origin, None), true).is_ok();
        assert!(changes("http://localhost:3000"));
        assert!(changes("http://127.0.0.1:8080"));
        assert!(changes("http://[::1]:5173"));
        assert!(!changes("https://evil.example"));
        assert!(check(&dev, &req("127.0.0.1:8080", "https://evil.example", None), false).is_ok(), "reads stay open");
        let star = config(Origins::Any, false);
        assert!(
            check(&star, &req("h", "https://evil.example", None), true).is_ok(),
            "an explicit * is the operator's call"
        );
    }

    #[test]
    fn origins_parse_with_default_ports_and_ipv6() {
        assert_eq!(
            Site::parse("HTTPS://A.example"),
            Some(Site { scheme: "https".into(), host: "a.example".into(), port: 443 })
        );
        assert_eq!(Site::parse("http://[::1]").map(|s| s.port), Some(80));
        assert_eq!(Site::parse("http://[::1]:9").map(|s| s.port), Some(9));
        assert_eq!(Site::parse("http://a:x"), None);
        assert_eq!(Site::parse("http://"), None);
    }
}

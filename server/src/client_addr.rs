//! Who a client is on the network: the TCP peer, or, when the peer is a proxy the operator
//! trusts (`--trusted-proxies`), the address that proxy saw, from the `X-Forwarded-For` it
//! appended. Per-address limits and the operator's connection list use it.
//!
//! Only the rightmost entries can be trusted: each proxy appends the address it received the
//! request from, so the chain is read from the right, skipping trusted proxies, and the first
//! address that is not one is the client. Anything a client wrote into the header itself is to
//! the left of that and never read.

use std::net::{IpAddr, SocketAddr};

use hyper::HeaderMap;

/// An address block like `10.0.0.0/8`, `192.0.2.7` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let net: IpAddr = addr.trim().parse().map_err(|_| format!("{text:?} is not an address or block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => {
                b.trim().parse::<u8>().ok().filter(|b| *b <= max).ok_or(format!("{text:?}: bad prefix length"))?
            }
            None => max,
        };
        Ok(Cidr { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` agree.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// The client's address for a request from `peer`.
pub fn resolve(trusted: &[Cidr], peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer.ip()) {
        return peer;
    }
    let chain = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let entries: Vec<IpAddr> = chain.filter_map(|e| e.trim().parse().ok()).collect();
    match entries.into_iter().rev().find(|ip| !is_trusted(*ip)) {
        Some(ip) => SocketAddr::new(ip, 0),
        None => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn blocks_contain_what_their_prefix_says() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.3.4".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("172.16.0.0/12").unwrap().contains("172.31.255.1".parse().unwrap()));
        assert!(!Cidr::parse("172.16.0.0/12").unwrap().contains("172.32.0.1".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains("::ffff:127.0.0.1".parse().unwrap()), "mapped v4");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }

    #[test]
    fn only_a_trusted_peer_is_believed_and_only_from_the_right() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let proxy: SocketAddr = "10.1.1.1:5000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.9:5000".parse().unwrap();
        let client = |peer, xff: &[&str]| resolve(&trusted, peer, &headers(xff)).ip().to_string();
        assert_eq!(client(proxy, &["203.0.113.5"]), "203.0.113.5");
        assert_eq!(client(proxy, &["1.2.3.4, 203.0.113.5, 10.2.2.2"]), "203.0.113.5", "a chain of proxies");
        assert_eq!(client(proxy, &["1.2.3.4", "203.0.113.5"]), "203.0.113.5", "several headers");
        assert_eq!(client(stranger, &["203.0.113.5"]), "198.51.100.9", "a client cannot claim an address");
        assert_eq!(client(proxy, &[]), "10.1.1.1");
    }
}

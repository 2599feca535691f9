//! Token buckets: a sustained rate with a burst above it. One per client connection (its
//! commands) and one for the server API (`--api-rate-limit`).

use std::time::{Duration, Instant};

/// A token bucket holding up to `burst` tokens, refilled at `rate` per second.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self { rate: rate as f64, burst: burst as f64, tokens: burst as f64, at: Instant::now() }
    }

    /// Takes one token at `now`; `Err` says how long until the next one.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.tokens = (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate.max(f64::MIN_POSITIVE)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate_and_says_when_to_come_back() {
        let mut r = RateLimiter::new(10, 3);
        let t0 = r.at;
        assert!((0..3).all(|_| r.take(t0).is_ok()));
        let wait = r.take(t0).unwrap_err();
        assert!((Duration::from_millis(99)..=Duration::from_millis(100)).contains(&wait), "{wait:?}");
        assert!(r.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(r.take(t0 + Duration::from_millis(100)).is_err());
    }
}

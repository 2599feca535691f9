//! A panic in a connection task is a bug: tokio keeps the node serving everyone else, and this
//! hook makes sure the operator hears of it, as an error log line with the location and as
//! `pushd_panics_total` (the fuzzers watch it). The default hook still prints as before.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

static PANICS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// Installs the hook once per process.
pub fn install() {
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::Relaxed);
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            tracing::error!(%location, panic = %info, "a task panicked (a bug; please report it): its connection is gone, the node goes on");
            default(info);
        }));
    });
}

/// Panics in this process so far.
pub fn count() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_anywhere_in_the_process_is_counted() {
        super::install();
        let before = super::count();
        let joined = std::thread::spawn(|| panic!("a deliberate panic in a test")).join();
        assert!(joined.is_err());
        assert!(super::count() > before);
    }
}

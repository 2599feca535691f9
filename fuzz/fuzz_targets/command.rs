//! Client command frames: parsing never panics, and whatever parses has a known op.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(cmd) = pushd::protocol::Command::parse(text)
    {
        assert!(["subscribe", "unsubscribe", "publish", "ping", "presence"].contains(&cmd.op.name()));
    }
});

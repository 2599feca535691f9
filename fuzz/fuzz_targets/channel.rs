//! Channel names and globs: parsing never panics, accepted names keep to their alphabet, and
//! matching terminates.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (pattern, name) = text.split_once('\n').unwrap_or((text, text));
    if let Ok(ch) = pushd::channel::ChannelName::parse(name) {
        assert!(ch.as_str().chars().all(|c| c.is_ascii_alphanumeric() || "_.:@/=-".contains(c)));
    }
    if let Ok(p) = pushd::channel::ChannelPattern::parse(pattern) {
        let _ = p.matches(name);
    }
});

//! Published data: any valid JSON is either refused (too deep) or kept as the same JSON on one
//! line; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(raw) = serde_json::value::RawValue::from_string(text.to_owned()) else { return };
    if let Ok(msg) = pushd::engine::NewMessage::new(None, raw) {
        assert!(!msg.data.get().contains('\n'));
    }
});

//! SSE cursors (`Last-Event-ID`, `?since=`): parsing never panics for any channel count.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&n, rest)) = data.split_first()
        && let Ok(text) = std::str::from_utf8(rest)
    {
        let _ = pushd::cursor::Cursor::parse(Some(text), n as usize);
    }
});

//! Client tokens: any bytes as a token are refused or accepted without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let auth = pushd::auth::Authenticator::new(Some("pushd-fuzz-secret-0123456789"));
        let _ = auth.authenticate(Some(token), None);
    }
});

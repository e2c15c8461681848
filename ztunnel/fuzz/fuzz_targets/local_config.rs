//! Hostile local-mode config files: `source::local::parse` on arbitrary text must return a
//! `State` or an error naming the problem, never panic, loop or exhaust the stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ztunnel::source::local::parse("fuzz.yaml", text) {
        Ok(state) => drop(state),
        Err(error) => {
            // Errors are shown to operators: rendering them must not panic either.
            let message = error.to_string();
            assert!(message.starts_with("fuzz.yaml"), "{message}");
        }
    }
});

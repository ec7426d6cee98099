//! Fuzzes the GGUF parser: any byte string must parse or fail with an error, never panic,
//! hang or allocate beyond what the input can hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = spark::gguf::parse_bytes(data) {
        // Whatever parsed must describe bytes that exist.
        for t in &parsed.tensors {
            if let Some(bytes) = t.bytes {
                assert!(parsed.data_offset + t.offset + bytes <= data.len() as u64);
            }
        }
    }
});

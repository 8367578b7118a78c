//! Any bytes as an encoded program, validated against a worker's budget.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    corvid_kernels::fuzzing::validate_bytes(data);
});

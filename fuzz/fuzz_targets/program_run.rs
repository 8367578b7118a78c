//! A well-typed but adversarial program built from the bytes, validated and run on the CPU.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    corvid_kernels::fuzzing::run_structured(data);
});

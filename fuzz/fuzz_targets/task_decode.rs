//! Any bytes as a `/corvid/task/3` request, decoded and checked as a worker would.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    corvid_node::net::task::decode_request_for_fuzzing(data);
});

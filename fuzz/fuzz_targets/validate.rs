//! Any byte string as a whole store file: the validator must reject it or return a
//! header whose tensors lie inside the buffer and tile its data section, and
//! `MappedFile::open` on the same bytes must agree. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../rust/tests/fuzz_common.rs"]
mod fuzz_common;

fuzz_target!(|data: &[u8]| {
    fuzz_common::check_image(data);
    fuzz_common::check_on_disk(data, fuzz_common::fuzz_scratch_dir());
});

//! Like `validate`, but the 8-byte length prefix is computed from the input (see
//! `image_from_json_input`), so mutations explore the JSON header and the data section
//! instead of mostly breaking the prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../rust/tests/fuzz_common.rs"]
mod fuzz_common;

fuzz_target!(|data: &[u8]| {
    let image = fuzz_common::image_from_json_input(data);
    fuzz_common::check_image(&image);
    fuzz_common::check_on_disk(&image, fuzz_common::fuzz_scratch_dir());
});

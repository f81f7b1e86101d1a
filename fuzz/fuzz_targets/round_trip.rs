//! Writer -> reader: tensors and metadata decoded from the input are written with
//! `store::write_file`, opened with `MappedFile::open`, and must come back unchanged
//! (or the write must fail cleanly for a reserved or duplicate name).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../rust/tests/fuzz_common.rs"]
mod fuzz_common;

fuzz_target!(|data: &[u8]| {
    let _written = fuzz_common::check_round_trip(data, fuzz_common::fuzz_scratch_dir());
});

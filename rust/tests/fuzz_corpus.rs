//! Replays the fuzzing corpus kept in `rust/tests/fuzz_corpus/` under the same property
//! checks as the fuzz targets in `fuzz/` (see `fuzz/README.md`):
//!
//! - `images/`: inputs of the `validate` target, whole file images for the validator
//!   and `MappedFile::open`;
//! - `json/`: inputs of the `validate_json` target (2-byte JSON length, JSON, data),
//!   expanded to file images the same way the target does;
//! - `round_trip/`: inputs of the `round_trip` target (writer -> reader).
//!
//! Each directory doubles as the seed corpus of its target. Inputs that once failed a
//! target are kept under a `crash-` name.

use std::fs;
use std::path::{Path, PathBuf};

mod fuzz_common;

fn corpus(sub: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rust/tests/fuzz_corpus")
        .join(sub);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file, reporting every failing file rather than the first.
/// `check` returns whether the input was accepted (a valid file, a successful write);
/// each corpus holds both kinds on purpose, so that both the accepted-input invariants
/// and the rejections are exercised.
fn replay(sub: &str, check: impl Fn(&[u8]) -> bool) {
    let files = corpus(sub);
    assert!(
        files.len() >= 10,
        "{sub}: the corpus is missing ({} files)",
        files.len()
    );
    let mut failed = Vec::new();
    let mut accepted = 0;
    for f in &files {
        let bytes = fs::read(f).unwrap();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes))) {
            Ok(ok) => accepted += usize::from(ok),
            Err(_) => failed.push(f.display().to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "{sub}: {} inputs failed: {failed:#?}",
        failed.len()
    );
    let n = files.len();
    assert!(
        accepted > 0 && accepted < n,
        "{sub}: {accepted} of {n} inputs accepted"
    );
}

#[test]
fn images_satisfy_the_validator_properties() {
    let dir = fuzz_common::scratch_dir();
    replay("images", |bytes| {
        fuzz_common::check_on_disk(bytes, dir.path());
        fuzz_common::check_image(bytes).is_some()
    });
}

#[test]
fn json_inputs_satisfy_the_validator_properties() {
    let dir = fuzz_common::scratch_dir();
    replay("json", |input| {
        let image = fuzz_common::image_from_json_input(input);
        fuzz_common::check_on_disk(&image, dir.path());
        fuzz_common::check_image(&image).is_some()
    });
}

#[test]
fn round_trip_inputs_come_back_unchanged() {
    let dir = fuzz_common::scratch_dir();
    replay("round_trip", |input| {
        fuzz_common::check_round_trip(input, dir.path())
    });
}
#[test]
fn json_input_expansion_computes_the_prefix() {
    let input = [3, 0, b'{', b'}', b' ', 7];
    let image = fuzz_common::image_from_json_input(&input);
    assert_eq!(&image[..8], &3u64.to_le_bytes());
    assert_eq!(&image[8..], b"{} \x07");
    // A length past the end is clamped to the input.
    let image = fuzz_common::image_from_json_input(&[255, 255, b'{', b'}']);
    assert_eq!(&image[..8], &2u64.to_le_bytes());
}

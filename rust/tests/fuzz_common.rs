//! The properties that the fuzz targets (`fuzz/fuzz_targets/`) and the regression-corpus
//! test (`rust/tests/fuzz_corpus.rs`) check. Both include this one file, so an input
//! saved from a fuzzing run is replayed under exactly the checks that flagged it.
//!
//! Every check panics on a violation; returning normally means the input passed.

#![allow(dead_code)] // each includer uses a different subset

use std::fs;
use std::path::{Path, PathBuf};

use emberfl_core::dtype::Dtype;
use emberfl_core::header::{self, Header, HeaderError, DATA_ALIGNMENT};
use emberfl_core::store::{self, MappedFile, StoreError, StoreErrorKind, TensorRef};

/// Validates `bytes` as a whole file image and checks the validator's contract:
/// it returns an error, or a header whose tensors lie inside `bytes`, tile the data
/// section exactly and hold `numel(shape) * itemsize` bytes each. Any length change of
/// an accepted image must then be rejected.
pub fn check_image(bytes: &[u8]) -> Option<Header> {
    check_parse_with_any_length(bytes);
    let h = match store::validate_image(bytes) {
        Ok(h) => h,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "rejections must say why");
            return None;
        }
    };
    check_header(bytes, &h);
    // Exact tiling means no accepted image stays valid when cut or extended by a byte.
    let cut = store::validate_image(&bytes[..bytes.len() - 1]);
    assert!(
        cut.is_err(),
        "accepted image still valid without its last byte"
    );
    let mut longer = bytes.to_vec();
    longer.push(0);
    assert!(
        store::validate_image(&longer).is_err(),
        "accepted image with a trailing byte"
    );
    Some(h)
}

/// `header::parse` is public, so a caller may pass a file length that does not match the
/// JSON it hands over: whatever length it claims, parse must answer, not panic, and an
/// accepted header must cover exactly the claimed data section.
fn check_parse_with_any_length(bytes: &[u8]) {
    let Ok(n) = header::header_len(bytes, bytes.len() as u64) else {
        return;
    };
    let json = &bytes[8..8 + n];
    let fits = 8 + n as u64;
    for claimed in [0, fits - 1, fits, bytes.len() as u64 + 1, u64::MAX] {
        match header::parse(json, claimed) {
            Ok(h) => {
                let covered = h.tensors.last().map_or(0, |t| t.end) as u64;
                assert_eq!(
                    h.data_start as u64 + covered,
                    claimed,
                    "parse accepted a length it does not cover"
                );
            }
            // A length too short to hold the header must be reported as such once the
            // JSON itself is readable (a wrapped subtraction once reported it as
            // trailing bytes, and panicked with overflow checks on).
            Err(e) if claimed < fits => assert!(
                matches!(
                    e,
                    HeaderError::HeaderDoesNotFit { .. }
                        | HeaderError::InvalidUtf8(_)
                        | HeaderError::InvalidJson(_)
                        | HeaderError::NotAnObject
                ),
                "claimed {claimed}: {e:?}"
            ),
            Err(_) => {}
        }
    }
}

/// The invariants of a header accepted for the file image `bytes`.
pub fn check_header(bytes: &[u8], h: &Header) {
    let prefix = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(
        h.data_start as u64,
        8 + prefix,
        "data section starts right after the JSON"
    );
    assert!(prefix <= header::MAX_HEADER_LEN);
    assert!(h.data_start <= bytes.len());
    let data_len = bytes.len() - h.data_start;
    let mut cursor = 0usize;
    let mut names = std::collections::HashSet::new();
    for t in &h.tensors {
        assert!(
            names.insert(t.name.as_str()),
            "tensor {:?} listed twice",
            t.name
        );
        assert_ne!(t.name, "__metadata__");
        assert_eq!(
            t.start, cursor,
            "tensor {:?} does not start where the last ended",
            t.name
        );
        assert!(t.start <= t.end);
        let want = header::numel(&t.shape)
            .and_then(|n| n.checked_mul(t.dtype.itemsize()))
            .expect("accepted shapes do not overflow");
        assert_eq!(
            t.end - t.start,
            want,
            "tensor {:?}: byte length != shape x itemsize",
            t.name
        );
        let abs_end = h
            .data_start
            .checked_add(t.end)
            .expect("range end overflows");
        assert!(
            abs_end <= bytes.len(),
            "tensor {:?} runs past the buffer",
            t.name
        );
        // The slice a reader would take must exist.
        let _ = &bytes[h.data_start + t.start..abs_end];
        cursor = t.end;
    }
    assert_eq!(
        cursor, data_len,
        "tensors do not cover the data section exactly"
    );
    if let Some(meta) = &h.metadata {
        let mut keys = std::collections::HashSet::new();
        for (k, _) in meta {
            assert!(keys.insert(k.as_str()), "metadata key {k:?} listed twice");
        }
    }
}

/// A directory for scratch files, on tmpfs where there is one: the fuzz targets write a
/// file per input and should not wear a disk.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("emberfl-fuzz")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("emberfl-fuzz")
        .tempdir()
        .unwrap()
}

static FUZZ_DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();

extern "C" {
    fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn remove_fuzz_dir() {
    if let Some(d) = FUZZ_DIR.get() {
        let _ = fs::remove_dir_all(d.path());
    }
}

/// The scratch directory of a fuzzing process. libFuzzer ends with `exit()`, which runs
/// no Rust destructors, so the directory is removed by an `atexit` hook instead.
pub fn fuzz_scratch_dir() -> &'static Path {
    FUZZ_DIR
        .get_or_init(|| {
            // SAFETY: registers a plain function that touches only the static above.
            unsafe { atexit(remove_fuzz_dir) };
            scratch_dir()
        })
        .path()
}

/// Writes `bytes` to a file in `dir` and checks that `MappedFile::open` agrees with the
/// in-memory validator: the same header and the same data bytes, or the same header
/// error (with the file's path in front of its message). Also checks `dtype_range` for
/// every dtype.
pub fn check_on_disk(bytes: &[u8], dir: &Path) {
    let path = dir.join("image.safetensors");
    fs::write(&path, bytes).unwrap();
    let in_memory = store::validate_image(bytes);
    match (MappedFile::open(&path), in_memory) {
        (Ok(m), Ok(h)) => {
            assert_eq!(
                m.header, h,
                "open and validate_image disagree on the header"
            );
            assert_eq!(
                m.data(),
                &bytes[h.data_start..],
                "mapped data differ from the file"
            );
            for d in Dtype::WRITE_ORDER {
                check_dtype_range(&m, d);
            }
        }
        (Err(e), Err(want)) => {
            assert_eq!(e.to_string(), format!("{}: {want}", path.display()));
            match e.kind {
                StoreErrorKind::Header(got) => assert_eq!(got, want),
                other => panic!("open said {other:?}, validate_image said {want:?}"),
            }
        }
        (Ok(_), Err(e)) => panic!("open accepted what validate_image rejected: {e}"),
        (Err(e), Ok(_)) => panic!("open rejected what validate_image accepted: {e}"),
    }
    fs::remove_file(&path).unwrap();
}

/// `dtype_range(d)` must be the exact span of the non-empty tensors of `d` when they are
/// contiguous, an error when another non-empty tensor lies between them, and `None`
/// only when the file has no tensor of `d`.
fn check_dtype_range(m: &MappedFile, d: Dtype) {
    let of_d: Vec<_> = m.header.tensors.iter().filter(|t| t.dtype == d).collect();
    let nonempty: Vec<_> = of_d.iter().filter(|t| t.start < t.end).collect();
    let got = m.dtype_range(d);
    if of_d.is_empty() {
        assert!(matches!(got, Ok(None)), "{d}: {got:?}");
        return;
    }
    if nonempty.is_empty() {
        let (s, e) = got.unwrap().unwrap();
        assert_eq!(s, e);
        assert!(e <= m.data().len());
        return;
    }
    let lo = nonempty.iter().map(|t| t.start).min().unwrap();
    let hi = nonempty.iter().map(|t| t.end).max().unwrap();
    let total: usize = nonempty.iter().map(|t| t.end - t.start).sum();
    if total == hi - lo {
        assert_eq!(got.ok(), Some(Some((lo, hi))), "{d} range");
    } else {
        assert!(
            matches!(
                &got,
                Err(StoreError { kind: StoreErrorKind::NotContiguous { dtype, .. }, .. })
                    if *dtype == d
            ),
            "{d} tensors are split but dtype_range gave {got:?}"
        );
    }
}

/// Reads fuzz bytes as a stream of small choices; past the end every read is zero, so
/// every input decodes to something.
struct Choices<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Choices<'a> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos += n;
        &self.data[start..end]
    }

    fn string(&mut self) -> String {
        let n = usize::from(self.byte() % 16);
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }
}

/// One tensor to write, owned.
#[derive(Debug)]
pub struct Spec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Decodes fuzz bytes into tensors (up to 7, up to 3 dims of up to 5 each) and optional
/// metadata (up to 3 pairs). Names and strings are arbitrary UTF-8, so duplicates and
/// the reserved `__metadata__` come up.
pub fn decode_round_trip(input: &[u8]) -> (Vec<Spec>, Option<Vec<(String, String)>>) {
    let mut c = Choices {
        data: input,
        pos: 0,
    };
    let flags = c.byte();
    let mut specs = Vec::new();
    for _ in 0..(flags & 7) {
        let name = match c.byte() % 8 {
            0 => "__metadata__".to_string(),
            _ => c.string(),
        };
        let dtype = Dtype::WRITE_ORDER[usize::from(c.byte() % 10)];
        let ndim = c.byte() % 4;
        let shape: Vec<usize> = (0..ndim).map(|_| usize::from(c.byte() % 6)).collect();
        let len = header::byte_len(dtype, &shape).unwrap();
        let seed = c.byte();
        // Bytes from the input where there are enough, then a pattern, so the data of
        // different tensors differ and a misplaced range shows.
        let mut data = c.bytes(len).to_vec();
        let have = data.len();
        data.extend((have..len).map(|i| seed.wrapping_add((i as u8).wrapping_mul(31))));
        specs.push(Spec {
            name,
            dtype,
            shape,
            data,
        });
    }
    let metadata = if flags & 8 != 0 {
        let n = c.byte() % 4;
        Some((0..n).map(|_| (c.string(), c.string())).collect())
    } else {
        None
    };
    (specs, metadata)
}

/// Writes the decoded tensors with `store::write_file`, opens the file and checks that
/// the same names, dtypes, shapes, bytes and metadata come back, in the documented file
/// order; or, for a reserved or duplicate name, that writing fails and leaves nothing.
/// Returns whether the file was written.
pub fn check_round_trip(input: &[u8], dir: &Path) -> bool {
    let (specs, metadata) = decode_round_trip(input);
    let path: PathBuf = dir.join("rt.safetensors");
    let _ = fs::remove_file(&path);
    let refs: Vec<TensorRef<'_>> = specs
        .iter()
        .map(|s| TensorRef {
            name: &s.name,
            dtype: s.dtype,
            shape: &s.shape,
            data: &s.data,
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let must_fail = specs
        .iter()
        .any(|s| s.name == "__metadata__" || !seen.insert(s.name.as_str()));
    let written = store::write_file(&path, &refs, metadata.as_deref(), false);
    if must_fail {
        let e = written.expect_err("a reserved or duplicate name was written");
        assert!(
            matches!(
                e.kind,
                StoreErrorKind::ReservedName | StoreErrorKind::DuplicateName { .. }
            ),
            "{e:?}"
        );
        assert_eq!(
            fs::read_dir(dir).unwrap().count(),
            0,
            "a failed write left files"
        );
        return false;
    }
    written.unwrap();
    assert_eq!(
        fs::read_dir(dir).unwrap().count(),
        1,
        "temporary files left behind"
    );

    let bytes = fs::read(&path).unwrap();
    let h = check_image(&bytes).expect("a file the store wrote fails validation");
    assert_eq!(
        h.data_start % DATA_ALIGNMENT,
        0,
        "data section is not page aligned"
    );

    // File order: grouped by dtype, widest first, input order within a dtype.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| specs[i].dtype.rank());
    let m = MappedFile::open(&path).unwrap();
    assert_eq!(m.header, h);
    assert_eq!(m.header.tensors.len(), specs.len());
    for (t, &i) in m.header.tensors.iter().zip(&order) {
        let s = &specs[i];
        assert_eq!((&t.name, t.dtype, &t.shape), (&s.name, s.dtype, &s.shape));
        assert_eq!(
            &m.data()[t.start..t.end],
            s.data.as_slice(),
            "tensor {:?} bytes",
            s.name
        );
    }
    for d in Dtype::WRITE_ORDER {
        check_dtype_range(&m, d);
        // Files we write keep each dtype contiguous.
        assert!(m.dtype_range(d).is_ok());
    }
    // Metadata is a JSON object, so a repeated key keeps its first position and its last value.
    let expected_meta = metadata.map(|pairs| {
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            match out.iter_mut().find(|(ek, _)| *ek == k) {
                Some(slot) => slot.1 = v,
                None => out.push((k, v)),
            }
        }
        out
    });
    assert_eq!(m.header.metadata, expected_meta);
    drop(m);
    fs::remove_file(&path).unwrap();
    true
}

/// The `validate_json` target's input: two bytes giving the JSON length, then the JSON,
/// then the data section. The prefix is computed, so the fuzzer spends its effort on
/// the header's content rather than on matching a length.
pub fn image_from_json_input(input: &[u8]) -> Vec<u8> {
    if input.len() < 2 {
        return input.to_vec();
    }
    let rest = &input[2..];
    let n = usize::from(u16::from_le_bytes([input[0], input[1]])).min(rest.len());
    let mut image = Vec::with_capacity(8 + rest.len());
    image.extend_from_slice(&(n as u64).to_le_bytes());
    image.extend_from_slice(rest);
    image
}

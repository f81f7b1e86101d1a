//! The safetensors header: parsing with full validation, and serialisation.
//!
//! A file is `u64 little-endian header length` + `JSON header` + `data section`. The
//! parser checks everything a reader relies on before any tensor is handed out: the
//! header length is bounded and inside the file, the JSON is UTF-8 and well formed,
//! dtypes are known, `shape x itemsize` equals the byte length (with overflow
//! checks), and the tensors tile the data section exactly: no gaps, no overlaps,
//! nothing past its end and nothing left over.

use std::fmt;

use serde_json::{Map, Value};

use crate::dtype::Dtype;

/// The largest JSON header we accept (the same bound as the reference implementation).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Data sections of files we write start at a multiple of this.
pub const DATA_ALIGNMENT: usize = 4096;

/// Why a header was rejected: one variant per check, carrying what its message names,
/// so that callers (and tests) can tell failures apart without reading the text. The
/// messages are part of the Python API (`StoreError`'s text) and stay as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The file has no bytes at all.
    EmptyFile,
    /// The file (or the prefix read from it) is shorter than the 8-byte length prefix.
    NoPrefix {
        file_len: u64,
    },
    /// The prefix declares a JSON header longer than [`MAX_HEADER_LEN`].
    HeaderTooLarge {
        len: u64,
    },
    /// The prefix declares a JSON header shorter than `{}`.
    HeaderTooSmall {
        len: u64,
    },
    /// The prefix declares a JSON header that does not fit in the file.
    HeaderPastEnd {
        len: u64,
        file_len: u64,
    },
    /// A `file_len` passed to [`parse`] that cannot hold the prefix and the JSON.
    HeaderDoesNotFit {
        header_len: usize,
        file_len: u64,
    },
    /// The data section's length does not fit in `usize`.
    FileTooLarge,
    InvalidUtf8(std::str::Utf8Error),
    /// serde_json's description of the syntax error.
    InvalidJson(String),
    /// The JSON is valid but not an object.
    NotAnObject,
    MetadataNotObject,
    /// `value` is the offending JSON value, as JSON text.
    MetadataValueNotString {
        key: String,
        value: String,
    },
    /// A tensor entry that is not a JSON object.
    EntryNotObject {
        name: String,
    },
    UnexpectedField {
        name: String,
        field: String,
    },
    MissingDtype {
        name: String,
    },
    UnsupportedDtype {
        name: String,
        dtype: String,
    },
    MissingShape {
        name: String,
    },
    /// `value` is the offending JSON value, as JSON text.
    BadShapeDim {
        name: String,
        value: String,
    },
    MissingOffsets {
        name: String,
    },
    OffsetCount {
        name: String,
        count: usize,
    },
    /// `value` is the offending JSON value, as JSON text.
    BadOffset {
        name: String,
        value: String,
    },
    OffsetsReversed {
        name: String,
        start: usize,
        end: usize,
    },
    /// `numel(shape) * itemsize` overflows `usize`.
    ShapeOverflow {
        name: String,
        shape: Vec<usize>,
    },
    /// The offsets hold a different number of bytes than `shape` of `dtype` needs.
    SizeMismatch {
        name: String,
        start: usize,
        end: usize,
        shape: Vec<usize>,
        dtype: Dtype,
        expected: usize,
    },
    /// The tensor starts before the previous one (in offset order) ends.
    Overlap {
        name: String,
        start: usize,
        end: usize,
        previous_end: usize,
    },
    /// The tensor starts after the previous one (in offset order) ends.
    Hole {
        name: String,
        start: usize,
        end: usize,
        after: usize,
    },
    /// The tensors need more bytes than the data section holds.
    Truncated {
        needed: usize,
        data_len: usize,
    },
    /// The data section holds bytes after the last tensor.
    TrailingBytes {
        data_len: usize,
        covered: usize,
    },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use HeaderError as E;
        match self {
            E::EmptyFile => f.write_str("empty file (0 bytes): not a safetensors file"),
            E::NoPrefix { file_len } => write!(
                f,
                "file is {file_len} bytes, shorter than the 8-byte header length prefix"
            ),
            E::HeaderTooLarge { len } => write!(
                f,
                "header length {len} exceeds the limit of {MAX_HEADER_LEN} bytes"
            ),
            E::HeaderTooSmall { len } => {
                write!(f, "header length {len} is too small to hold a JSON object")
            }
            E::HeaderPastEnd { len, file_len } => write!(
                f,
                "header length {len} runs past the end of the file ({file_len} bytes): truncated?"
            ),
            E::HeaderDoesNotFit {
                header_len,
                file_len,
            } => write!(
                f,
                "header of {header_len} bytes does not fit in a file of {file_len} bytes"
            ),
            E::FileTooLarge => f.write_str("file too large for this platform"),
            E::InvalidUtf8(e) => write!(f, "header is not valid UTF-8 ({e})"),
            E::InvalidJson(e) => write!(f, "header is not valid JSON ({e})"),
            E::NotAnObject => f.write_str("header is not a JSON object"),
            E::MetadataNotObject => f.write_str("__metadata__ must be a JSON object of strings"),
            E::MetadataValueNotString { key, value } => {
                write!(f, "__metadata__[{key:?}] must be a string, got {value}")
            }
            E::EntryNotObject { name } => write!(f, "tensor {name:?}: entry must be a JSON object"),
            E::UnexpectedField { name, field } => {
                write!(f, "tensor {name:?}: unexpected field {field:?}")
            }
            E::MissingDtype { name } => {
                write!(f, "tensor {name:?}: missing or non-string \"dtype\"")
            }
            E::UnsupportedDtype { name, dtype } => {
                write!(f, "tensor {name:?}: unsupported dtype {dtype:?}")
            }
            E::MissingShape { name } => {
                write!(f, "tensor {name:?}: missing or non-array \"shape\"")
            }
            E::BadShapeDim { name, value } => write!(
                f,
                "tensor {name:?}: shape dimensions must be non-negative integers, got {value}"
            ),
            E::MissingOffsets { name } => {
                write!(f, "tensor {name:?}: missing or non-array \"data_offsets\"")
            }
            E::OffsetCount { name, count } => write!(
                f,
                "tensor {name:?}: data_offsets must have 2 entries, got {count}"
            ),
            E::BadOffset { name, value } => write!(
                f,
                "tensor {name:?}: data_offsets must be non-negative integers, got {value}"
            ),
            E::OffsetsReversed { name, start, end } => write!(
                f,
                "tensor {name:?}: data_offsets [{start}, {end}] end before they start"
            ),
            E::ShapeOverflow { name, shape } => write!(
                f,
                "tensor {name:?}: shape {shape:?} overflows the address space"
            ),
            E::SizeMismatch {
                name,
                start,
                end,
                shape,
                dtype,
                expected,
            } => write!(
                f,
                "tensor {name:?}: data_offsets [{start}, {end}] hold {} bytes but shape \
                 {shape:?} of {dtype} needs {expected}",
                end.saturating_sub(*start)
            ),
            E::Overlap {
                name,
                start,
                end,
                previous_end,
            } => write!(
                f,
                "tensor {name:?}: data_offsets [{start}, {end}] overlap the previous tensor \
                 (which ends at {previous_end})"
            ),
            E::Hole {
                name,
                start,
                end,
                after,
            } => write!(
                f,
                "tensor {name:?}: data_offsets [{start}, {end}] leave a hole after byte {after}"
            ),
            E::Truncated { needed, data_len } => write!(
                f,
                "tensors need {needed} data bytes but the file holds {data_len}: truncated?"
            ),
            E::TrailingBytes { data_len, covered } => write!(
                f,
                "file has {} trailing bytes after the last tensor (data section is {data_len} \
                 bytes, tensors cover {covered})",
                data_len.saturating_sub(*covered)
            ),
        }
    }
}

impl std::error::Error for HeaderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HeaderError::InvalidUtf8(e) => Some(e),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Tensors in file order (by data offset).
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__`, in the order it was written.
    pub metadata: Option<Vec<(String, String)>>,
    /// Offset of the data section from the start of the file.
    pub data_start: usize,
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Byte length of a tensor, or `None` on overflow.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    numel(shape)?.checked_mul(dtype.itemsize())
}

/// Reads the 8-byte prefix and returns the JSON header's length after checking it
/// against `file_len`.
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<usize, HeaderError> {
    if file_len == 0 {
        return Err(HeaderError::EmptyFile);
    }
    let Some(bytes) = prefix.first_chunk::<8>().filter(|_| file_len >= 8) else {
        return Err(HeaderError::NoPrefix { file_len });
    };
    let len = u64::from_le_bytes(*bytes);
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { len });
    }
    if len < 2 {
        return Err(HeaderError::HeaderTooSmall { len });
    }
    if 8 + len > file_len {
        return Err(HeaderError::HeaderPastEnd { len, file_len });
    }
    Ok(len as usize)
}

/// A non-negative integer that fits `usize`; `bad` builds the error from the value's
/// JSON text.
fn as_usize(v: &Value, bad: impl FnOnce(String) -> HeaderError) -> Result<usize, HeaderError> {
    v.as_u64()
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| bad(v.to_string()))
}

fn parse_tensor(name: &str, v: &Value) -> Result<TensorInfo, HeaderError> {
    let named = || name.to_owned();
    let obj = v
        .as_object()
        .ok_or_else(|| HeaderError::EntryNotObject { name: named() })?;
    if let Some(key) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(HeaderError::UnexpectedField {
            name: named(),
            field: key.clone(),
        });
    }
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| HeaderError::MissingDtype { name: named() })?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| HeaderError::UnsupportedDtype {
        name: named(),
        dtype: dtype_name.to_owned(),
    })?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| HeaderError::MissingShape { name: named() })?
        .iter()
        .map(|d| {
            as_usize(d, |value| HeaderError::BadShapeDim {
                name: named(),
                value,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| HeaderError::MissingOffsets { name: named() })?;
    let [start, end] = offsets.as_slice() else {
        return Err(HeaderError::OffsetCount {
            name: named(),
            count: offsets.len(),
        });
    };
    let bad_offset = |value| HeaderError::BadOffset {
        name: named(),
        value,
    };
    let start = as_usize(start, bad_offset)?;
    let end = as_usize(end, bad_offset)?;
    if end < start {
        return Err(HeaderError::OffsetsReversed {
            name: named(),
            start,
            end,
        });
    }
    let Some(expected) = byte_len(dtype, &shape) else {
        return Err(HeaderError::ShapeOverflow {
            name: named(),
            shape,
        });
    };
    if end - start != expected {
        return Err(HeaderError::SizeMismatch {
            name: named(),
            start,
            end,
            shape,
            dtype,
            expected,
        });
    }
    Ok(TensorInfo {
        name: named(),
        dtype,
        shape,
        start,
        end,
    })
}

/// Parses and validates a JSON header of `json.len()` bytes for a file of `file_len` bytes.
pub fn parse(json: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let text = std::str::from_utf8(json).map_err(HeaderError::InvalidUtf8)?;
    let root: Map<String, Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(HeaderError::NotAnObject),
        Err(e) => return Err(HeaderError::InvalidJson(e.to_string())),
    };
    let data_start = 8 + json.len();
    // `header_len` already guarantees this for real files; checked here too so that a
    // caller passing an inconsistent `file_len` gets an error rather than a wrapped length.
    let data_len =
        file_len
            .checked_sub(data_start as u64)
            .ok_or(HeaderError::HeaderDoesNotFit {
                header_len: json.len(),
                file_len,
            })?;
    let data_len = usize::try_from(data_len).map_err(|_| HeaderError::FileTooLarge)?;

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(root.len());
    for (name, v) in &root {
        if name == "__metadata__" {
            let obj = v.as_object().ok_or(HeaderError::MetadataNotObject)?;
            let mut pairs = Vec::with_capacity(obj.len());
            for (k, val) in obj {
                let s = val
                    .as_str()
                    .ok_or_else(|| HeaderError::MetadataValueNotString {
                        key: k.clone(),
                        value: val.to_string(),
                    })?;
                pairs.push((k.clone(), s.to_owned()));
            }
            metadata = Some(pairs);
        } else {
            tensors.push(parse_tensor(name, v)?);
        }
    }

    // Tile check: sorted by (start, end), every tensor must begin where the previous
    // one ended, and the last must end exactly at the end of the data section.
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut cursor = 0usize;
    for t in &tensors {
        if t.start < cursor {
            return Err(HeaderError::Overlap {
                name: t.name.clone(),
                start: t.start,
                end: t.end,
                previous_end: cursor,
            });
        }
        if t.start > cursor {
            return Err(HeaderError::Hole {
                name: t.name.clone(),
                start: t.start,
                end: t.end,
                after: cursor,
            });
        }
        cursor = t.end;
    }
    if cursor > data_len {
        return Err(HeaderError::Truncated {
            needed: cursor,
            data_len,
        });
    }
    if cursor < data_len {
        return Err(HeaderError::TrailingBytes {
            data_len,
            covered: cursor,
        });
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// Serialises `tensors` (already in file order, offsets filled in) and `metadata`
/// into the full prefix + JSON header, padded with spaces so that the data section
/// starts at a multiple of [`DATA_ALIGNMENT`].
pub fn serialize(tensors: &[TensorInfo], metadata: Option<&[(String, String)]>) -> Vec<u8> {
    let mut root = Map::new();
    if let Some(meta) = metadata {
        let obj: Map<String, Value> = meta
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        root.insert("__metadata__".into(), Value::Object(obj));
    }
    for t in tensors {
        let mut entry = Map::new();
        entry.insert("dtype".into(), Value::String(t.dtype.name().into()));
        entry.insert(
            "shape".into(),
            Value::Array(t.shape.iter().map(|&d| Value::from(d as u64)).collect()),
        );
        entry.insert(
            "data_offsets".into(),
            Value::Array(vec![Value::from(t.start as u64), Value::from(t.end as u64)]),
        );
        root.insert(t.name.clone(), Value::Object(entry));
    }
    let json = serde_json::to_vec(&Value::Object(root)).expect("JSON of strings and integers");
    let unpadded = 8 + json.len();
    let total = unpadded.div_ceil(DATA_ALIGNMENT) * DATA_ALIGNMENT;
    let header_len = (total - 8) as u64;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(total, b' ');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, dtype: Dtype, shape: &[usize], start: usize) -> TensorInfo {
        let end = start + byte_len(dtype, shape).unwrap();
        TensorInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            start,
            end,
        }
    }

    fn parse_full(bytes: &[u8]) -> Result<Header, HeaderError> {
        let n = header_len(bytes, bytes.len() as u64)?;
        parse(&bytes[8..8 + n], bytes.len() as u64)
    }

    #[test]
    fn serialize_then_parse_round_trips_and_aligns() {
        let tensors = vec![
            info("a", Dtype::F32, &[2, 3], 0),
            info("b", Dtype::F16, &[4], 24),
            info("empty", Dtype::U8, &[0, 5], 32),
            info("scalar", Dtype::U8, &[], 32),
        ];
        let meta = vec![("format".to_string(), "pt".to_string())];
        let mut bytes = serialize(&tensors, Some(&meta));
        assert_eq!(bytes.len() % DATA_ALIGNMENT, 0);
        bytes.resize(bytes.len() + 33, 0);
        let h = parse_full(&bytes).unwrap();
        assert_eq!(h.data_start % DATA_ALIGNMENT, 0);
        assert_eq!(h.metadata, Some(meta));
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "empty", "scalar"]);
    }

    #[test]
    fn rejects_holes_overlaps_and_trailing_bytes() {
        let hole = vec![
            info("a", Dtype::F32, &[1], 0),
            info("b", Dtype::F32, &[1], 8),
        ];
        let mut bytes = serialize(&hole, None);
        bytes.resize(bytes.len() + 12, 0);
        assert_eq!(
            parse_full(&bytes),
            Err(HeaderError::Hole {
                name: "b".into(),
                start: 8,
                end: 12,
                after: 4
            })
        );

        let overlap = vec![
            info("a", Dtype::F32, &[2], 0),
            info("b", Dtype::F32, &[1], 4),
        ];
        let mut bytes = serialize(&overlap, None);
        bytes.resize(bytes.len() + 8, 0);
        assert_eq!(
            parse_full(&bytes),
            Err(HeaderError::Overlap {
                name: "b".into(),
                start: 4,
                end: 8,
                previous_end: 8
            })
        );

        let one = vec![info("a", Dtype::F32, &[1], 0)];
        let mut bytes = serialize(&one, None);
        bytes.resize(bytes.len() + 5, 0);
        assert_eq!(
            parse_full(&bytes),
            Err(HeaderError::TrailingBytes {
                data_len: 5,
                covered: 4
            })
        );
        bytes.truncate(bytes.len() - 3);
        assert_eq!(
            parse_full(&bytes),
            Err(HeaderError::Truncated {
                needed: 4,
                data_len: 2
            })
        );
    }

    #[test]
    fn rejects_bad_prefixes() {
        assert_eq!(header_len(&[], 0), Err(HeaderError::EmptyFile));
        assert_eq!(
            header_len(&[1, 2, 3], 3),
            Err(HeaderError::NoPrefix { file_len: 3 })
        );
        // A prefix cut short by the read, in a file long enough to hold one.
        assert_eq!(
            header_len(&[1, 2, 3], 100),
            Err(HeaderError::NoPrefix { file_len: 100 })
        );
        let huge = u64::MAX.to_le_bytes();
        assert_eq!(
            header_len(&huge, 100),
            Err(HeaderError::HeaderTooLarge { len: u64::MAX })
        );
        assert_eq!(
            header_len(&1u64.to_le_bytes(), 100),
            Err(HeaderError::HeaderTooSmall { len: 1 })
        );
        let past = 50u64.to_le_bytes();
        assert_eq!(
            header_len(&past, 20),
            Err(HeaderError::HeaderPastEnd {
                len: 50,
                file_len: 20
            })
        );
        assert_eq!(header_len(&12u64.to_le_bytes(), 20), Ok(12));
    }

    #[test]
    fn rejects_bad_json_and_fields() {
        type Check = fn(&HeaderError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("not json", |e| matches!(e, HeaderError::InvalidJson(_))),
            ("[1,2]", |e| *e == HeaderError::NotAnObject),
            (
                r#"{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
                |e| {
                    *e == HeaderError::UnsupportedDtype {
                        name: "a".into(),
                        dtype: "F99".into(),
                    }
                },
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                |e| {
                    *e == HeaderError::BadShapeDim {
                        name: "a".into(),
                        value: "-1".into(),
                    }
                },
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,"4"]}}"#,
                |e| {
                    *e == HeaderError::BadOffset {
                        name: "a".into(),
                        value: "\"4\"".into(),
                    }
                },
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                |e| {
                    *e == HeaderError::OffsetsReversed {
                        name: "a".into(),
                        start: 4,
                        end: 0,
                    }
                },
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
                |e| {
                    *e == HeaderError::OffsetCount {
                        name: "a".into(),
                        count: 1,
                    }
                },
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                |e| {
                    *e == HeaderError::SizeMismatch {
                        name: "a".into(),
                        start: 0,
                        end: 4,
                        shape: vec![2],
                        dtype: Dtype::F32,
                        expected: 8,
                    }
                },
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
                |e| matches!(e, HeaderError::ShapeOverflow { .. }),
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
                |e| {
                    *e == HeaderError::UnexpectedField {
                        name: "a".into(),
                        field: "x".into(),
                    }
                },
            ),
            (r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#, |e| {
                *e == HeaderError::MissingDtype { name: "a".into() }
            }),
            (r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#, |e| {
                *e == HeaderError::MissingShape { name: "a".into() }
            }),
            (r#"{"a":{"dtype":"F32","shape":[1]}}"#, |e| {
                *e == HeaderError::MissingOffsets { name: "a".into() }
            }),
            (r#"{"__metadata__":{"k":1}}"#, |e| {
                *e == HeaderError::MetadataValueNotString {
                    key: "k".into(),
                    value: "1".into(),
                }
            }),
            (r#"{"__metadata__":[]}"#, |e| {
                *e == HeaderError::MetadataNotObject
            }),
            (r#"{"a":5}"#, |e| {
                *e == HeaderError::EntryNotObject { name: "a".into() }
            }),
        ];
        for (json, check) in cases {
            let err = parse(json.as_bytes(), 8 + json.len() as u64 + 4).unwrap_err();
            assert!(check(&err), "{json}: {err:?}");
        }
        let bad_utf8 = [b'{', 0xff, b'}'];
        assert!(matches!(
            parse(&bad_utf8, 11),
            Err(HeaderError::InvalidUtf8(_))
        ));
    }

    #[test]
    fn file_len_shorter_than_the_header_is_an_error() {
        // 8 + 2 bytes of header cannot fit in a 9-byte file.
        for file_len in [9, 0] {
            assert_eq!(
                parse(b"{}", file_len),
                Err(HeaderError::HeaderDoesNotFit {
                    header_len: 2,
                    file_len
                })
            );
        }
        assert!(parse(b"{}", 10).is_ok());
    }

    #[test]
    fn messages_name_the_offending_values() {
        // `StoreError`'s text in Python is this Display; spot-check the formatting of
        // values (quoted names, JSON text, shapes) that the variants carry.
        let e = HeaderError::SizeMismatch {
            name: "w".into(),
            start: 0,
            end: 4,
            shape: vec![2],
            dtype: Dtype::F32,
            expected: 8,
        };
        assert_eq!(
            e.to_string(),
            "tensor \"w\": data_offsets [0, 4] hold 4 bytes but shape [2] of F32 needs 8"
        );
        let e = HeaderError::TrailingBytes {
            data_len: 9,
            covered: 4,
        };
        assert_eq!(
            e.to_string(),
            "file has 5 trailing bytes after the last tensor (data section is 9 bytes, \
             tensors cover 4)"
        );
    }
}

//! The safetensors header: parsing with full validation, and serialisation.
//!
//! A file is `u64 little-endian header length` + `JSON header` + `data section`. The
//! parser checks everything a reader relies on before any tensor is handed out: the
//! header length is bounded and inside the file, the JSON is UTF-8 and well formed,
//! dtypes are known, shapes stay within what numpy and torch can represent, `shape x
//! itemsize` equals the byte length (with overflow checks), the number of tensors and
//! the size of `__metadata__` are bounded, and the tensors tile the data section
//! exactly: no gaps, no overlaps, nothing past its end and nothing left over.
//!
//! The JSON is read in two passes, neither of which builds a tree of the whole header:
//! the first checks the syntax and splits the top-level object into its entries, kept
//! as borrowed JSON text; the second reads each entry into exactly the fields it may
//! have, stopping a shape at [`MAX_NDIM`] dimensions and the metadata at
//! [`MAX_METADATA_ENTRIES`] entries. The memory a header costs is therefore bounded by
//! what it validly describes, not by what its JSON could hold.

use std::collections::HashMap;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::dtype::Dtype;

/// The largest JSON header we accept (the same bound as the reference implementation).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The most tensors a header may list: far more than any model's state dict (a large
/// language model has a few thousand), few enough that opening a file never builds
/// more than this many Python objects.
pub const MAX_TENSORS: usize = 100_000;

/// The most dimensions a tensor may have: numpy's own limit (`NPY_MAXDIMS` of numpy 2).
pub const MAX_NDIM: usize = 64;

/// The largest dimension, and the largest byte size of a shape's non-zero dimensions:
/// numpy and torch hold sizes and strides as signed pointer-sized integers.
pub const MAX_DIM: usize = isize::MAX as usize;

/// The most `__metadata__` entries a header may hold: metadata is a few descriptive
/// strings (emberfl writes at most six).
pub const MAX_METADATA_ENTRIES: usize = 4096;

/// The most bytes (UTF-8, after JSON unescaping) that `__metadata__`'s keys and values
/// may hold together.
pub const MAX_METADATA_BYTES: usize = 16 << 20;

/// Data sections of files we write start at a multiple of this.
pub const DATA_ALIGNMENT: usize = 4096;

/// The key of the metadata entry.
const METADATA_KEY: &str = "__metadata__";

/// Rejected JSON values are quoted in messages up to this many bytes of their text.
const MAX_QUOTED: usize = 200;

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
    /// The header lists more than [`MAX_TENSORS`] tensors.
    TooManyTensors,
    MetadataNotObject,
    /// `__metadata__` has more than [`MAX_METADATA_ENTRIES`] entries.
    MetadataTooManyEntries,
    /// `value` is the offending JSON value, as JSON text.
    MetadataValueNotString {
        key: String,
        value: String,
    },
    /// `__metadata__`'s keys and values hold more than [`MAX_METADATA_BYTES`] bytes.
    MetadataTooLarge {
        bytes: usize,
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
    /// The shape has more than [`MAX_NDIM`] dimensions (`ndim` of them).
    TooManyDims {
        name: String,
        ndim: usize,
    },
    /// `value` is the offending JSON value, as JSON text.
    BadShapeDim {
        name: String,
        value: String,
    },
    /// A dimension larger than [`MAX_DIM`].
    DimTooLarge {
        name: String,
        dim: usize,
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
    /// The product of the shape's non-zero dimensions times the item size exceeds
    /// [`MAX_DIM`]: no array of it can exist, even an empty one (numpy checks it).
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
            E::TooManyTensors => {
                write!(f, "header lists more than {MAX_TENSORS} tensors, the limit")
            }
            E::MetadataNotObject => f.write_str("__metadata__ must be a JSON object of strings"),
            E::MetadataTooManyEntries => write!(
                f,
                "__metadata__ has more than {MAX_METADATA_ENTRIES} entries, the limit"
            ),
            E::MetadataValueNotString { key, value } => {
                write!(f, "__metadata__[{key:?}] must be a string, got {value}")
            }
            E::MetadataTooLarge { bytes } => write!(
                f,
                "__metadata__ holds {bytes} bytes of keys and values, more than the limit of \
                 {MAX_METADATA_BYTES}"
            ),
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
            E::TooManyDims { name, ndim } => write!(
                f,
                "tensor {name:?}: shape has {ndim} dimensions, more than the limit of {MAX_NDIM}"
            ),
            E::BadShapeDim { name, value } => write!(
                f,
                "tensor {name:?}: shape dimensions must be non-negative integers, got {value}"
            ),
            E::DimTooLarge { name, dim } => write!(
                f,
                "tensor {name:?}: shape dimension {dim} exceeds the limit of {MAX_DIM}"
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

/// Checks `shape` of `dtype` against the limits numpy and torch put on arrays
/// ([`MAX_NDIM`] dimensions, each at most [`MAX_DIM`], and the item size times the
/// non-zero dimensions at most [`MAX_DIM`]; numpy refuses a larger one even when a zero
/// dimension makes it empty) and returns its byte length.
pub fn check_shape(name: &str, dtype: Dtype, shape: &[usize]) -> Result<usize, HeaderError> {
    if shape.len() > MAX_NDIM {
        return Err(HeaderError::TooManyDims {
            name: name.to_owned(),
            ndim: shape.len(),
        });
    }
    if let Some(&dim) = shape.iter().find(|&&d| d > MAX_DIM) {
        return Err(HeaderError::DimTooLarge {
            name: name.to_owned(),
            dim,
        });
    }
    let extent = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(dtype.itemsize(), |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_DIM);
    match extent {
        Some(n) if !shape.contains(&0) => Ok(n),
        Some(_) => Ok(0),
        None => Err(HeaderError::ShapeOverflow {
            name: name.to_owned(),
            shape: shape.to_vec(),
        }),
    }
}

/// Checks `__metadata__` (as written: a repeated key keeps its last value, as in a JSON
/// object) against [`MAX_METADATA_ENTRIES`] and [`MAX_METADATA_BYTES`].
pub fn check_metadata(pairs: &[(String, String)]) -> Result<(), HeaderError> {
    let mut last: HashMap<&str, &str> = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        last.insert(k, v);
    }
    if last.len() > MAX_METADATA_ENTRIES {
        return Err(HeaderError::MetadataTooManyEntries);
    }
    let bytes = last.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_METADATA_BYTES {
        return Err(HeaderError::MetadataTooLarge { bytes });
    }
    Ok(())
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

// ---------------------------------------------------------------- first pass

/// The top level of a header after the first pass: its entries in object order, as
/// JSON text borrowed from the header. A repeated key keeps its first position and its
/// last value, as in a JSON object read into a map.
enum Root<'a> {
    NotAnObject,
    Entries {
        entries: Vec<(String, &'a RawValue)>,
        /// More than [`MAX_TENSORS`] tensors: the entries past the limit were only
        /// checked for syntax, not kept.
        too_many: bool,
    },
}

struct RootVisitor;

impl<'de> Visitor<'de> for RootVisitor {
    type Value = Root<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Root<'de>, A::Error> {
        let mut entries: Vec<(String, &'de RawValue)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut tensors = 0usize;
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<&'de RawValue>()?;
            if let Some(&i) = index.get(&key) {
                entries[i].1 = value;
                continue;
            }
            if key != METADATA_KEY {
                tensors += 1;
                if tensors > MAX_TENSORS {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    return Ok(Root::Entries {
                        entries,
                        too_many: true,
                    });
                }
            }
            index.insert(key.clone(), entries.len());
            entries.push((key, value));
        }
        Ok(Root::Entries {
            entries,
            too_many: false,
        })
    }

    // Anything else is valid JSON but the wrong kind of header: read it to its end, so
    // that a syntax error after it is still reported as one.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Root<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Root::NotAnObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Root<'de>, E> {
        Ok(Root::NotAnObject)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Root<'de>, E> {
        Ok(Root::NotAnObject)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Root<'de>, E> {
        Ok(Root::NotAnObject)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Root<'de>, E> {
        Ok(Root::NotAnObject)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Root<'de>, E> {
        Ok(Root::NotAnObject)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Root<'de>, E> {
        Ok(Root::NotAnObject)
    }
}

// --------------------------------------------------------------- second pass

/// The second pass's reading of `raw` (JSON the first pass checked) with `seed`:
/// `Ok(None)` when the value is of another kind than `seed` reads. A string the first
/// pass let through but that does not decode (a lone surrogate escape) is invalid JSON.
fn read_with<'a, S: DeserializeSeed<'a>>(
    raw: &'a RawValue,
    seed: S,
) -> Result<Option<S::Value>, HeaderError> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v)) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_syntax() => Err(HeaderError::InvalidJson(e.to_string())),
        Err(_) => Ok(None),
    }
}

/// [`read_with`] for a plain type.
fn read_as<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Result<Option<T>, HeaderError> {
    read_with(raw, std::marker::PhantomData::<T>)
}

/// A non-negative integer that fits `usize`, or `None`.
fn read_usize(raw: &RawValue) -> Result<Option<usize>, HeaderError> {
    Ok(read_as::<u64>(raw)?.and_then(|x| usize::try_from(x).ok()))
}

/// A rejected value as its message quotes it: compact JSON text, as serde_json writes
/// it, cut after [`MAX_QUOTED`] bytes.
fn json_text(raw: &RawValue) -> String {
    let text = raw.get();
    if text.len() <= MAX_QUOTED {
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            return v.to_string();
        }
        return text.to_owned();
    }
    let mut end = MAX_QUOTED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A JSON array's first `max` elements, as text, and its length.
struct Prefix<'a> {
    items: Vec<&'a RawValue>,
    len: usize,
}

/// Reads an array into a [`Prefix`] of at most `.0` elements; the rest are counted, not kept.
struct PrefixSeed(usize);

impl<'de> DeserializeSeed<'de> for PrefixSeed {
    type Value = Prefix<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Prefix<'de>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PrefixSeed {
    type Value = Prefix<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prefix<'de>, A::Error> {
        let mut items = Vec::new();
        while items.len() < self.0 {
            match seq.next_element::<&'de RawValue>()? {
                Some(item) => items.push(item),
                None => {
                    let len = items.len();
                    return Ok(Prefix { items, len });
                }
            }
        }
        let mut len = items.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            len += 1;
        }
        Ok(Prefix { items, len })
    }
}

/// A tensor entry's fields, as text; reading stops at the first field it may not have.
#[derive(Default)]
struct EntryFields<'a> {
    dtype: Option<&'a RawValue>,
    shape: Option<&'a RawValue>,
    offsets: Option<&'a RawValue>,
    unexpected: Option<String>,
}

impl<'de> Deserialize<'de> for EntryFields<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EntryVisitor)
    }
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = EntryFields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tensor entry")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EntryFields<'de>, A::Error> {
        let mut fields = EntryFields::default();
        while let Some(key) = map.next_key::<String>()? {
            let slot = match key.as_str() {
                "dtype" => &mut fields.dtype,
                "shape" => &mut fields.shape,
                "data_offsets" => &mut fields.offsets,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    fields.unexpected = Some(key);
                    return Ok(fields);
                }
            };
            // A repeated field keeps its last value, as in a JSON object read into a map.
            *slot = Some(map.next_value::<&'de RawValue>()?);
        }
        Ok(fields)
    }
}

/// `__metadata__`'s entries, as text, in object order (a repeated key keeps its first
/// position and its last value); `too_many` past [`MAX_METADATA_ENTRIES`] distinct keys,
/// whose entries are then no longer kept.
struct MetadataEntries<'a> {
    entries: Vec<(String, &'a RawValue)>,
    too_many: bool,
}

impl<'de> Deserialize<'de> for MetadataEntries<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(MetadataVisitor)
    }
}

struct MetadataVisitor;

impl<'de> Visitor<'de> for MetadataVisitor {
    type Value = MetadataEntries<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MetadataEntries<'de>, A::Error> {
        let mut entries: Vec<(String, &'de RawValue)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<&'de RawValue>()?;
            if let Some(&i) = index.get(&key) {
                entries[i].1 = value;
            } else if entries.len() == MAX_METADATA_ENTRIES {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(MetadataEntries {
                    entries,
                    too_many: true,
                });
            } else {
                index.insert(key.clone(), entries.len());
                entries.push((key, value));
            }
        }
        Ok(MetadataEntries {
            entries,
            too_many: false,
        })
    }
}

fn parse_metadata(raw: &RawValue) -> Result<Vec<(String, String)>, HeaderError> {
    let found = read_as::<MetadataEntries<'_>>(raw)?.ok_or(HeaderError::MetadataNotObject)?;
    if found.too_many {
        return Err(HeaderError::MetadataTooManyEntries);
    }
    let mut pairs = Vec::with_capacity(found.entries.len());
    for (key, value) in found.entries {
        let Some(s) = read_as::<String>(value)? else {
            return Err(HeaderError::MetadataValueNotString {
                value: json_text(value),
                key,
            });
        };
        pairs.push((key, s));
    }
    check_metadata(&pairs)?;
    Ok(pairs)
}

fn parse_tensor(name: &str, raw: &RawValue) -> Result<TensorInfo, HeaderError> {
    let named = || name.to_owned();
    let fields = read_as::<EntryFields<'_>>(raw)?
        .ok_or_else(|| HeaderError::EntryNotObject { name: named() })?;
    if let Some(field) = fields.unexpected {
        return Err(HeaderError::UnexpectedField {
            name: named(),
            field,
        });
    }
    let dtype_name = match fields.dtype {
        Some(raw) => read_as::<String>(raw)?,
        None => None,
    }
    .ok_or_else(|| HeaderError::MissingDtype { name: named() })?;
    let dtype = Dtype::parse(&dtype_name).ok_or_else(|| HeaderError::UnsupportedDtype {
        name: named(),
        dtype: dtype_name.clone(),
    })?;
    // At most one dimension past the limit is kept: the rest are only counted.
    let dims = match fields.shape {
        Some(raw) => read_with(raw, PrefixSeed(MAX_NDIM + 1))?,
        None => None,
    }
    .ok_or_else(|| HeaderError::MissingShape { name: named() })?;
    if dims.len > MAX_NDIM {
        return Err(HeaderError::TooManyDims {
            name: named(),
            ndim: dims.len,
        });
    }
    let mut shape = Vec::with_capacity(dims.items.len());
    for d in dims.items {
        let dim = read_usize(d)?.ok_or_else(|| HeaderError::BadShapeDim {
            name: named(),
            value: json_text(d),
        })?;
        if dim > MAX_DIM {
            return Err(HeaderError::DimTooLarge { name: named(), dim });
        }
        shape.push(dim);
    }
    let offsets = match fields.offsets {
        Some(raw) => read_with(raw, PrefixSeed(2))?,
        None => None,
    }
    .ok_or_else(|| HeaderError::MissingOffsets { name: named() })?;
    let (2, [start, end]) = (offsets.len, offsets.items.as_slice()) else {
        return Err(HeaderError::OffsetCount {
            name: named(),
            count: offsets.len,
        });
    };
    let offset = |raw: &RawValue| {
        read_usize(raw)?.ok_or_else(|| HeaderError::BadOffset {
            name: named(),
            value: json_text(raw),
        })
    };
    let start = offset(start)?;
    let end = offset(end)?;
    if end < start {
        return Err(HeaderError::OffsetsReversed {
            name: named(),
            start,
            end,
        });
    }
    let expected = check_shape(name, dtype, &shape)?;
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
    let mut de = serde_json::Deserializer::from_str(text);
    let root = (&mut de)
        .deserialize_any(RootVisitor)
        .and_then(|root| de.end().map(|()| root))
        .map_err(|e| HeaderError::InvalidJson(e.to_string()))?;
    let Root::Entries { entries, too_many } = root else {
        return Err(HeaderError::NotAnObject);
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
    if too_many {
        return Err(HeaderError::TooManyTensors);
    }

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, raw) in &entries {
        if name == METADATA_KEY {
            metadata = Some(parse_metadata(raw)?);
        } else {
            tensors.push(parse_tensor(name, raw)?);
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
        root.insert(METADATA_KEY.into(), Value::Object(obj));
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

    /// Parses `json` as the header of a file whose data section is `data_len` bytes.
    fn parse_with_data(json: &str, data_len: u64) -> Result<Header, HeaderError> {
        parse(json.as_bytes(), 8 + json.len() as u64 + data_len)
    }

    fn one_tensor(dtype: &str, shape: &str, offsets: &str) -> String {
        format!(r#"{{"a":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}"#)
    }

    fn dims(n: usize) -> String {
        format!("[{}]", vec!["1"; n].join(","))
    }

    #[test]
    fn rejects_more_dimensions_than_numpy_allows() {
        assert!(parse_with_data(&one_tensor("U8", &dims(MAX_NDIM), "[0,1]"), 1).is_ok());
        for ndim in [MAX_NDIM + 1, 200_000] {
            assert_eq!(
                parse_with_data(&one_tensor("U8", &dims(ndim), "[0,1]"), 1),
                Err(HeaderError::TooManyDims {
                    name: "a".into(),
                    ndim
                })
            );
        }
        let e = HeaderError::TooManyDims {
            name: "a".into(),
            ndim: 65,
        };
        assert_eq!(
            e.to_string(),
            "tensor \"a\": shape has 65 dimensions, more than the limit of 64"
        );
    }

    #[test]
    fn rejects_dimensions_past_isize_max_even_in_empty_tensors() {
        let max = MAX_DIM;
        for dim in [max as u64 + 1, u64::MAX] {
            let shape = format!("[0,{dim}]");
            assert_eq!(
                parse_with_data(&one_tensor("F32", &shape, "[0,0]"), 0),
                Err(HeaderError::DimTooLarge {
                    name: "a".into(),
                    dim: dim as usize
                })
            );
        }
        assert!(parse_with_data(&one_tensor("U8", &format!("[0,{max}]"), "[0,0]"), 0).is_ok());
    }

    #[test]
    fn rejects_empty_tensors_whose_other_dimensions_overflow() {
        // numpy multiplies the non-zero dimensions and the item size in isize even when a
        // zero dimension makes the array empty, and refuses what overflows.
        for (dtype, shape) in [
            ("F32", format!("[0,{}]", 1u64 << 62)),
            ("U8", format!("[{},0,2]", 1u64 << 62)),
            ("F64", format!("[0,{},{}]", 1u64 << 31, 1u64 << 31)),
        ] {
            let e = parse_with_data(&one_tensor(dtype, &shape, "[0,0]"), 0).unwrap_err();
            assert!(
                matches!(&e, HeaderError::ShapeOverflow { name, .. } if name == "a"),
                "{shape}: {e:?}"
            );
        }
        // 4 * 2**60 bytes is as far as an empty float32 array of these dimensions goes.
        let ok = format!("[0,{}]", 1u64 << 60);
        assert!(parse_with_data(&one_tensor("F32", &ok, "[0,0]"), 0).is_ok());
        assert_eq!(check_shape("a", Dtype::F32, &[2, 3]), Ok(24));
        assert_eq!(check_shape("a", Dtype::F32, &[0, 1 << 60]), Ok(0));
        assert!(check_shape("a", Dtype::F32, &[0, 1 << 61]).is_err());
    }

    fn empty_tensors(n: usize) -> String {
        let body: Vec<String> = (0..n)
            .map(|i| format!(r#""{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#))
            .collect();
        format!("{{{}}}", body.join(","))
    }

    #[test]
    fn rejects_more_tensors_than_the_limit() {
        let at_limit = parse_with_data(&empty_tensors(MAX_TENSORS), 0).unwrap();
        assert_eq!(at_limit.tensors.len(), MAX_TENSORS);
        assert_eq!(
            parse_with_data(&empty_tensors(MAX_TENSORS + 1), 0),
            Err(HeaderError::TooManyTensors)
        );
        // A repeated name is one tensor, and the metadata is none.
        let mut json = empty_tensors(MAX_TENSORS);
        json.pop();
        json.push_str(r#","0":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"__metadata__":{}}"#);
        assert_eq!(
            parse_with_data(&json, 0).unwrap().tensors.len(),
            MAX_TENSORS
        );
        // Past the limit the rest is still read for syntax.
        let mut broken = empty_tensors(MAX_TENSORS + 1);
        broken.pop();
        broken.push_str(",]");
        assert!(matches!(
            parse_with_data(&broken, 0),
            Err(HeaderError::InvalidJson(_))
        ));
    }

    fn metadata(entries: usize, value: &str) -> String {
        let body: Vec<String> = (0..entries)
            .map(|i| format!(r#""k{i}":"{value}""#))
            .collect();
        format!(r#"{{"__metadata__":{{{}}}}}"#, body.join(","))
    }

    #[test]
    fn rejects_metadata_past_its_limits() {
        let h = parse_with_data(&metadata(MAX_METADATA_ENTRIES, "v"), 0).unwrap();
        assert_eq!(h.metadata.unwrap().len(), MAX_METADATA_ENTRIES);
        assert_eq!(
            parse_with_data(&metadata(MAX_METADATA_ENTRIES + 1, "v"), 0),
            Err(HeaderError::MetadataTooManyEntries)
        );
        // Key "k0" and the value: two bytes short of the limit, at it, and past it.
        for (extra, ok) in [(0, true), (2, true), (3, false)] {
            let value = "x".repeat(MAX_METADATA_BYTES - 4 + extra);
            // (Never printed: the value is 16 MiB.)
            let got = parse_with_data(&metadata(1, &value), 0).map(|_| ());
            let want = if ok {
                Ok(())
            } else {
                Err(HeaderError::MetadataTooLarge {
                    bytes: MAX_METADATA_BYTES + 1,
                })
            };
            assert!(got == want, "{extra}: {:?}", got.err());
        }
        // Escapes count as the bytes they stand for: 18 MiB of JSON text, 6 MiB of value.
        let escaped = format!(
            r#"{{"__metadata__":{{"k":"{}"}}}}"#,
            r"\u00e9".repeat(3 << 20)
        );
        let got = parse_with_data(&escaped, 0).map(|h| h.metadata.unwrap()[0].1.len());
        assert!(got == Ok(6 << 20), "{:?}", got.err());
    }

    #[test]
    fn repeated_keys_keep_their_first_place_and_last_value() {
        // As a JSON object read into a map: the earlier, invalid value is replaced.
        let json = r#"{"a":{"dtype":"F99"},"__metadata__":{"k":1,"j":"x","k":"v"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let h = parse_with_data(json, 1).unwrap();
        assert_eq!(h.tensors.len(), 1);
        assert_eq!(h.tensors[0].dtype, Dtype::U8);
        assert_eq!(
            h.metadata,
            Some(vec![("k".into(), "v".into()), ("j".into(), "x".into())])
        );
        let json =
            r#"{"a":{"dtype":"F32","dtype":"U8","shape":[2],"shape":[1],"data_offsets":[0,1]}}"#;
        assert_eq!(parse_with_data(json, 1).unwrap().tensors[0].shape, [1]);
    }

    #[test]
    fn syntax_errors_win_over_errors_of_content() {
        for json in [
            r#"{"a":{"dtype":"F99"}, x"#,
            r#"{"a":{"dtype":"F32","shape":[1,[2,]],"data_offsets":[0,4]}}"#,
            r#"[1,2"#,
            r#"{"a":5} trailing"#,
        ] {
            let e = parse_with_data(json, 0).unwrap_err();
            assert!(matches!(e, HeaderError::InvalidJson(_)), "{json}: {e:?}");
        }
        // A lone surrogate escape is not a string, wherever it is.
        let json = r#"{"a":{"dtype":"\ud800","shape":[],"data_offsets":[0,1]}}"#;
        let e = parse_with_data(json, 1).unwrap_err();
        assert!(matches!(e, HeaderError::InvalidJson(_)), "{e:?}");
    }

    #[test]
    fn rejected_values_are_quoted_as_compact_json_and_cut_when_long() {
        let json = one_tensor("F32", r#"[1, [ 2 , {"x" : null} ]]"#, "[0,4]");
        assert_eq!(
            parse_with_data(&json, 4),
            Err(HeaderError::BadShapeDim {
                name: "a".into(),
                value: r#"[2,{"x":null}]"#.into()
            })
        );
        let long = format!(r#"["{}"]"#, "é".repeat(300));
        let Err(HeaderError::BadShapeDim { value, .. }) =
            parse_with_data(&one_tensor("F32", &long, "[0,4]"), 4)
        else {
            panic!("expected BadShapeDim");
        };
        assert!(
            value.ends_with("...") && value.len() <= MAX_QUOTED + 3,
            "{value}"
        );
        let json = one_tensor("F32", "[1]", "[0,4,8]");
        assert_eq!(
            parse_with_data(&json, 4),
            Err(HeaderError::OffsetCount {
                name: "a".into(),
                count: 3
            })
        );
    }
}

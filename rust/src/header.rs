//! The safetensors header: parsing with full validation, and serialisation.
//!
//! A file is `u64 little-endian header length` + `JSON header` + `data section`. The
//! parser checks everything a reader relies on before any tensor is handed out: the
//! header length is bounded and inside the file, the JSON is UTF-8 and well formed,
//! dtypes are known, `shape x itemsize` equals the byte length (with overflow
//! checks), and the tensors tile the data section exactly: no gaps, no overlaps,
//! nothing past its end and nothing left over.

use serde_json::{Map, Value};

use crate::dtype::Dtype;

/// The largest JSON header we accept (the same bound as the reference implementation).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Data sections of files we write start at a multiple of this.
pub const DATA_ALIGNMENT: usize = 4096;

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
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<usize, String> {
    if file_len == 0 {
        return Err("empty file (0 bytes): not a safetensors file".into());
    }
    if prefix.len() < 8 || file_len < 8 {
        return Err(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length prefix"
        ));
    }
    let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(format!(
            "header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes"
        ));
    }
    if n < 2 {
        return Err(format!("header length {n} is too small to hold a JSON object"));
    }
    if 8 + n > file_len {
        return Err(format!(
            "header length {n} runs past the end of the file ({file_len} bytes): truncated?"
        ));
    }
    Ok(n as usize)
}

fn as_usize(v: &Value, what: &str, name: &str) -> Result<usize, String> {
    v.as_u64()
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| format!("tensor {name:?}: {what} must be non-negative integers, got {v}"))
}

fn parse_tensor(name: &str, v: &Value) -> Result<TensorInfo, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("tensor {name:?}: entry must be a JSON object"))?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(format!("tensor {name:?}: unexpected field {key:?}"));
        }
    }
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("tensor {name:?}: missing or non-string \"dtype\""))?;
    let dtype = Dtype::parse(dtype_name)
        .ok_or_else(|| format!("tensor {name:?}: unsupported dtype {dtype_name:?}"))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("tensor {name:?}: missing or non-array \"shape\""))?
        .iter()
        .map(|d| as_usize(d, "shape dimensions", name))
        .collect::<Result<Vec<_>, _>>()?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("tensor {name:?}: missing or non-array \"data_offsets\""))?;
    if offsets.len() != 2 {
        return Err(format!(
            "tensor {name:?}: data_offsets must have 2 entries, got {}",
            offsets.len()
        ));
    }
    let start = as_usize(&offsets[0], "data_offsets", name)?;
    let end = as_usize(&offsets[1], "data_offsets", name)?;
    if end < start {
        return Err(format!(
            "tensor {name:?}: data_offsets [{start}, {end}] end before they start"
        ));
    }
    let expected = byte_len(dtype, &shape).ok_or_else(|| {
        format!("tensor {name:?}: shape {shape:?} overflows the address space")
    })?;
    if end - start != expected {
        return Err(format!(
            "tensor {name:?}: data_offsets [{start}, {end}] hold {} bytes but shape {shape:?} of {dtype} needs {expected}",
            end - start
        ));
    }
    Ok(TensorInfo {
        name: name.to_owned(),
        dtype,
        shape,
        start,
        end,
    })
}

/// Parses and validates a JSON header of `json.len()` bytes for a file of `file_len` bytes.
pub fn parse(json: &[u8], file_len: u64) -> Result<Header, String> {
    let text = std::str::from_utf8(json)
        .map_err(|e| format!("header is not valid UTF-8 ({e})"))?;
    let root: Map<String, Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err("header is not a JSON object".into()),
        Err(e) => return Err(format!("header is not valid JSON ({e})")),
    };
    let data_start = 8 + json.len();
    // `header_len` already guarantees this for real files; checked here too so that a
    // caller passing an inconsistent `file_len` gets an error rather than a wrapped length.
    let data_len = file_len.checked_sub(data_start as u64).ok_or_else(|| {
        format!("header of {} bytes does not fit in a file of {file_len} bytes", json.len())
    })?;
    let data_len = usize::try_from(data_len)
        .map_err(|_| "file too large for this platform".to_string())?;

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(root.len());
    for (name, v) in &root {
        if name == "__metadata__" {
            let obj = v
                .as_object()
                .ok_or("__metadata__ must be a JSON object of strings")?;
            let mut pairs = Vec::with_capacity(obj.len());
            for (k, val) in obj {
                let s = val.as_str().ok_or_else(|| {
                    format!("__metadata__[{k:?}] must be a string, got {val}")
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
            return Err(format!(
                "tensor {:?}: data_offsets [{}, {}] overlap the previous tensor (which ends at {cursor})",
                t.name, t.start, t.end
            ));
        }
        if t.start > cursor {
            return Err(format!(
                "tensor {:?}: data_offsets [{}, {}] leave a hole after byte {cursor}",
                t.name, t.start, t.end
            ));
        }
        cursor = t.end;
    }
    if cursor > data_len {
        return Err(format!(
            "tensors need {cursor} data bytes but the file holds {data_len}: truncated?"
        ));
    }
    if cursor < data_len {
        return Err(format!(
            "file has {} trailing bytes after the last tensor (data section is {data_len} bytes, tensors cover {cursor})",
            data_len - cursor
        ));
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

    fn parse_full(bytes: &[u8]) -> Result<Header, String> {
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
        let hole = vec![info("a", Dtype::F32, &[1], 0), info("b", Dtype::F32, &[1], 8)];
        let mut bytes = serialize(&hole, None);
        bytes.resize(bytes.len() + 12, 0);
        assert!(parse_full(&bytes).unwrap_err().contains("hole"));

        let overlap = vec![info("a", Dtype::F32, &[2], 0), info("b", Dtype::F32, &[1], 4)];
        let mut bytes = serialize(&overlap, None);
        bytes.resize(bytes.len() + 8, 0);
        assert!(parse_full(&bytes).unwrap_err().contains("overlap"));

        let one = vec![info("a", Dtype::F32, &[1], 0)];
        let mut bytes = serialize(&one, None);
        bytes.resize(bytes.len() + 5, 0);
        assert!(parse_full(&bytes).unwrap_err().contains("trailing"));
        bytes.truncate(bytes.len() - 3);
        assert!(parse_full(&bytes).unwrap_err().contains("truncated"));
    }

    #[test]
    fn rejects_bad_prefixes() {
        assert!(header_len(&[], 0).unwrap_err().contains("empty"));
        assert!(header_len(&[1, 2, 3], 3).unwrap_err().contains("shorter"));
        let huge = u64::MAX.to_le_bytes();
        assert!(header_len(&huge, 100).unwrap_err().contains("limit"));
        let past = 50u64.to_le_bytes();
        assert!(header_len(&past, 20).unwrap_err().contains("past the end"));
    }

    #[test]
    fn rejects_bad_json_and_fields() {
        let cases: &[(&str, &str)] = &[
            ("not json", "valid JSON"),
            ("[1,2]", "JSON object"),
            (r#"{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#, "unsupported dtype"),
            (r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, "non-negative"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, "end before"),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, "2 entries"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, "needs 8"),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
                "overflows",
            ),
            (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#, "unexpected"),
            (r#"{"__metadata__":{"k":1}}"#, "must be a string"),
            (r#"{"a":5}"#, "JSON object"),
        ];
        for (json, needle) in cases {
            let err = parse(json.as_bytes(), 8 + json.len() as u64 + 4).unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
        let bad_utf8 = [b'{', 0xff, b'}'];
        assert!(parse(&bad_utf8, 11).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn file_len_shorter_than_the_header_is_an_error() {
        // 8 + 2 bytes of header cannot fit in a 9-byte file.
        assert!(parse(b"{}", 9).unwrap_err().contains("does not fit"));
        assert!(parse(b"{}", 0).unwrap_err().contains("does not fit"));
        assert!(parse(b"{}", 10).is_ok());
    }
}

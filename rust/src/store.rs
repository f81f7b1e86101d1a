//! Writing store files atomically, and opening them: mapped for zero-copy reads, or
//! read into memory where a mapping could be cut short under the reader.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapMut, MmapOptions};

use crate::dtype::Dtype;
use crate::header::{self, Header, HeaderError, TensorInfo};

/// Any failure to write, open or validate a store file: the file, and what went wrong.
/// Displays as `<path>: <what went wrong>`.
#[derive(Debug)]
pub struct StoreError {
    pub path: PathBuf,
    pub kind: StoreErrorKind,
}

/// What went wrong with a store file, one variant per failure.
#[derive(Debug)]
pub enum StoreErrorKind {
    /// A tensor to write is named `__metadata__`, which the format reserves.
    ReservedName,
    DuplicateName {
        name: String,
    },
    /// A tensor to write has a different number of bytes than its shape needs.
    DataSize {
        name: String,
        given: usize,
        shape: Vec<usize>,
        dtype: Dtype,
        expected: usize,
    },
    /// Creating, writing, syncing or renaming the temporary file failed.
    Write(io::Error),
    /// The durable write's fsync of the target directory failed.
    SyncDir(io::Error),
    Open(io::Error),
    Stat(io::Error),
    /// The path names something other than a regular file: `what` says what it is
    /// ("a FIFO", "a directory", ...).
    NotAFile {
        what: &'static str,
    },
    /// Reading the length prefix failed.
    Read(io::Error),
    /// Reading the JSON header failed.
    ReadHeader(io::Error),
    /// Reading the data section into memory failed.
    ReadData(io::Error),
    /// The header is not valid; or, when writing, the tensors or metadata to write would
    /// make one that is not (they break one of the limits of [`header`]).
    Header(HeaderError),
    Map(io::Error),
    /// The file's length changed between the header check and the mapping or reading of
    /// its data.
    SizeChanged,
    /// The tensors of `dtype` do not form one byte range: tensor `between` splits them.
    NotContiguous {
        dtype: Dtype,
        between: String,
    },
}

impl StoreErrorKind {
    fn at(self, path: &Path) -> StoreError {
        StoreError {
            path: path.to_owned(),
            kind: self,
        }
    }
}

impl From<HeaderError> for StoreErrorKind {
    fn from(e: HeaderError) -> Self {
        StoreErrorKind::Header(e)
    }
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use StoreErrorKind as K;
        match self {
            K::ReservedName => f.write_str("\"__metadata__\" is reserved and cannot name a tensor"),
            K::DuplicateName { name } => write!(f, "duplicate tensor name {name:?}"),
            K::DataSize {
                name,
                given,
                shape,
                dtype,
                expected,
            } => write!(
                f,
                "tensor {name:?}: {given} bytes given but shape {shape:?} of {dtype} needs \
                 {expected}"
            ),
            K::Write(e) => write!(f, "write failed: {e}"),
            K::SyncDir(e) => write!(f, "fsync of directory failed: {e}"),
            K::Open(e) => write!(f, "cannot open: {e}"),
            K::Stat(e) => write!(f, "cannot stat: {e}"),
            K::NotAFile { what } => write!(f, "not a regular file ({what})"),
            K::Read(e) => write!(f, "cannot read: {e}"),
            K::ReadHeader(e) => write!(f, "cannot read header: {e}"),
            K::ReadData(e) => write!(f, "cannot read data: {e}"),
            K::Header(e) => e.fmt(f),
            K::Map(e) => write!(f, "cannot map: {e}"),
            K::SizeChanged => f.write_str("file changed size while being opened"),
            K::NotContiguous { dtype, between } => write!(
                f,
                "{dtype} tensors are not contiguous (tensor {between:?} lies between them)"
            ),
        }
    }
}

impl std::error::Error for StoreErrorKind {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        use StoreErrorKind as K;
        match self {
            K::Write(e)
            | K::SyncDir(e)
            | K::Open(e)
            | K::Stat(e)
            | K::Read(e)
            | K::ReadHeader(e)
            | K::ReadData(e)
            | K::Map(e) => Some(e),
            K::Header(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.kind)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

/// One tensor to write: its bytes must already be in the dtype's little-endian layout.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Lays tensors out grouped by dtype (see [`Dtype::WRITE_ORDER`]), keeping the given
/// order inside each group. Returns the indices of `tensors` in file order and
/// their header entries. Refuses what the reader would refuse (the limits of
/// [`header`]), so that every file written can be read back.
fn layout(tensors: &[TensorRef<'_>]) -> Result<(Vec<usize>, Vec<TensorInfo>), StoreErrorKind> {
    if tensors.len() > header::MAX_TENSORS {
        return Err(HeaderError::TooManyTensors.into());
    }
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(StoreErrorKind::ReservedName);
        }
        if !seen.insert(t.name) {
            return Err(StoreErrorKind::DuplicateName {
                name: t.name.to_owned(),
            });
        }
        let expected = header::check_shape(t.name, t.dtype, t.shape)?;
        if t.data.len() != expected {
            return Err(StoreErrorKind::DataSize {
                name: t.name.to_owned(),
                given: t.data.len(),
                shape: t.shape.to_vec(),
                dtype: t.dtype,
                expected,
            });
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].dtype.rank()); // stable: keeps order within a dtype
    let mut offset = 0usize;
    let infos = order
        .iter()
        .map(|&i| {
            let t = &tensors[i];
            let start = offset;
            offset += t.data.len();
            TensorInfo {
                name: t.name.to_owned(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                start,
                end: offset,
            }
        })
        .collect();
    Ok((order, infos))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_path_for(path: &Path) -> PathBuf {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    path.with_file_name(format!(
        ".{file_name}.{}-{n}-{nanos:08x}.tmp",
        std::process::id()
    ))
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `tensors` to `path` atomically: a temporary file in the same directory is
/// written (and fsynced when `durable`) and then renamed over `path`. On any error
/// the temporary file is removed and `path` is untouched.
pub fn write_file(
    path: &Path,
    tensors: &[TensorRef<'_>],
    metadata: Option<&[(String, String)]>,
    durable: bool,
) -> Result<(), StoreError> {
    let (order, infos) = layout(tensors).map_err(|e| e.at(path))?;
    if let Some(meta) = metadata {
        header::check_metadata(meta).map_err(|e| StoreErrorKind::from(e).at(path))?;
    }
    let head = header::serialize(&infos, metadata);
    let tmp = temp_path_for(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(&head)?;
        for &i in &order {
            file.write_all(tensors[i].data)?;
        }
        if durable {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(StoreErrorKind::Write(e).at(path));
    }
    if durable {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fsync_dir(dir).map_err(|e| StoreErrorKind::SyncDir(e).at(path))?;
    }
    Ok(())
}

/// Files up to this size are always read into memory rather than mapped: they are
/// usually read whole right after they are opened (a client's model), so a copy adds
/// little, and a copy cannot be cut short, whereas a mapped file that another program
/// truncates or rewrites in place kills the reader with SIGBUS.
pub const READ_MAX_BYTES: usize = 2 << 20;

/// How [`MappedFile::open_with`] gets at the data section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Map files larger than [`READ_MAX_BYTES`] (zero-copy; for files that are replaced
    /// by rename and never rewritten in place, as the store's own are), read the others.
    Auto,
    /// Read the whole data section into memory, however large: for files whose writer
    /// no one can vouch for.
    Copy,
}

/// Where an open file's data section is.
enum Data {
    /// The data section is empty.
    Empty,
    /// A private (copy-on-write) mapping of the whole file.
    Mapped(MmapMut),
    /// The data section, read into `buf[start..start + len]`.
    Owned {
        buf: Vec<u8>,
        start: usize,
        len: usize,
    },
}

/// A validated store file, mapped privately (copy-on-write) or read into memory (see
/// [`Access`]): writes through [`MappedFile::data_ptr`] never reach the file.
pub struct MappedFile {
    pub path: PathBuf,
    pub header: Header,
    data: Data,
}

/// What a file type is, for [`StoreErrorKind::NotAFile`].
fn describe(t: fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a special file"
    }
}

/// Opens `path` for reading. On Unix without blocking and without taking a controlling
/// terminal, in case it was replaced by a FIFO or a device after it was checked: the
/// caller checks again on the open file. A regular file reads the same either way.
fn open_for_reading(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    options.open(path)
}

/// Reads `len` bytes from `file`'s position into a new buffer, placed so that the byte
/// at `file_offset` of the file lands at the same address modulo [`DATA_ALIGNMENT`] as a
/// mapping of the file would put it: tensors are then aligned exactly as when mapped.
/// Running out of memory is an error, not an abort.
///
/// [`DATA_ALIGNMENT`]: header::DATA_ALIGNMENT
fn read_data(file: &mut File, file_offset: usize, len: usize) -> Result<Data, StoreErrorKind> {
    const ALIGN: usize = header::DATA_ALIGNMENT;
    let out_of_memory = || StoreErrorKind::ReadData(io::ErrorKind::OutOfMemory.into());
    let size = len.checked_add(ALIGN - 1).ok_or_else(out_of_memory)?;
    let mut buf: Vec<u8> = Vec::new();
    buf.try_reserve_exact(size).map_err(|_| out_of_memory())?;
    let addr = buf.as_ptr() as usize;
    // (file_offset - addr) mod ALIGN: `addr + start` is congruent to `file_offset`.
    let start = file_offset.wrapping_sub(addr) % ALIGN;
    buf.resize(start, 0);
    // Read into the reserved capacity, which is not zeroed first. `take` stops the read
    // at `len` bytes, which fit in that capacity, so the buffer is never reallocated.
    let got = Read::by_ref(file)
        .take(len as u64)
        .read_to_end(&mut buf)
        .map_err(StoreErrorKind::ReadData)?;
    assert_eq!(buf.as_ptr() as usize, addr, "the read moved the buffer");
    if got != len {
        return Err(StoreErrorKind::SizeChanged);
    }
    Ok(Data::Owned { buf, start, len })
}

impl MappedFile {
    /// Opens and validates `path` with [`Access::Auto`].
    pub fn open(path: &Path) -> Result<MappedFile, StoreError> {
        MappedFile::open_with(path, Access::Auto)
    }

    /// Opens and validates `path`, getting at its data section as `access` says. A path
    /// that is not a regular file (a FIFO, a directory, a device) is refused without
    /// waiting on it.
    pub fn open_with(path: &Path, access: Access) -> Result<MappedFile, StoreError> {
        // Checked before opening: opening a FIFO blocks until a writer comes, and opening
        // a device may do anything the device does on open.
        let meta = fs::metadata(path).map_err(|e| StoreErrorKind::Open(e).at(path))?;
        if !meta.is_file() {
            let what = describe(meta.file_type());
            return Err(StoreErrorKind::NotAFile { what }.at(path));
        }
        let mut file = open_for_reading(path).map_err(|e| StoreErrorKind::Open(e).at(path))?;
        let meta = file
            .metadata()
            .map_err(|e| StoreErrorKind::Stat(e).at(path))?;
        if !meta.is_file() {
            let what = describe(meta.file_type());
            return Err(StoreErrorKind::NotAFile { what }.at(path));
        }
        let file_len = meta.len();
        // The header is read with plain reads and validated before any data is touched.
        let header = read_header(&mut file, file_len).map_err(|e| e.at(path))?;
        // `parse` checked that the data section's length fits `usize`.
        let data_len = (file_len - header.data_start as u64) as usize;
        let data = if data_len == 0 {
            Data::Empty
        } else if access == Access::Copy || file_len <= READ_MAX_BYTES as u64 {
            // `read_header` left the file's position at the start of the data section.
            let data = read_data(&mut file, header.data_start, data_len).map_err(|e| e.at(path))?;
            let now = file
                .metadata()
                .map_err(|e| StoreErrorKind::Stat(e).at(path))?
                .len();
            if now != file_len {
                return Err(StoreErrorKind::SizeChanged.at(path));
            }
            data
        } else {
            // SAFETY: the mapping is private, so our writes never reach the file, and we
            // validated that the file is as long as the header says. What no check can
            // rule out is another program truncating or rewriting the file in place while
            // it is mapped (reading a page past the new end raises SIGBUS): only files
            // larger than READ_MAX_BYTES are mapped, when the caller did not ask for a
            // copy. The store's own files are published by rename and never modified
            // afterwards, so their length cannot shrink under the mapping.
            let m = unsafe { MmapOptions::new().map_copy(&file) }
                .map_err(|e| StoreErrorKind::Map(e).at(path))?;
            if m.len() as u64 != file_len {
                return Err(StoreErrorKind::SizeChanged.at(path));
            }
            Data::Mapped(m)
        };
        Ok(MappedFile {
            path: path.to_owned(),
            header,
            data,
        })
    }

    /// Whether the data section is a mapping of the file (rather than a copy in memory,
    /// or empty).
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Data::Mapped(_))
    }

    /// The data section.
    pub fn data(&self) -> &[u8] {
        match &self.data {
            Data::Empty => &[],
            Data::Mapped(m) => &m[self.header.data_start..],
            Data::Owned { buf, start, len } => &buf[*start..*start + *len],
        }
    }

    /// Pointer to the start of the data section; valid for `data().len()` bytes as
    /// long as `self` lives. Writable because the mapping is private (or the bytes are
    /// our own copy).
    pub fn data_ptr(&mut self) -> *mut u8 {
        let data_start = self.header.data_start;
        match &mut self.data {
            Data::Empty => std::ptr::NonNull::<u64>::dangling().as_ptr().cast(),
            Data::Mapped(m) => m[data_start..].as_mut_ptr(),
            Data::Owned { buf, start, len } => buf[*start..*start + *len].as_mut_ptr(),
        }
    }

    /// The byte range that covers every tensor of `dtype`, if they are contiguous
    /// (always true for files we write). `Ok(None)` when the file has none.
    pub fn dtype_range(&self, dtype: Dtype) -> Result<Option<(usize, usize)>, StoreError> {
        let mut range: Option<(usize, usize)> = None;
        let mut broken_by: Option<&str> = None;
        for t in &self.header.tensors {
            if t.start == t.end {
                continue; // empty tensors take no bytes and cannot split a range
            }
            match (&mut range, t.dtype == dtype) {
                (None, true) => range = Some((t.start, t.end)),
                (Some(r), true) => {
                    if let Some(other) = broken_by {
                        return Err(StoreErrorKind::NotContiguous {
                            dtype,
                            between: other.to_owned(),
                        }
                        .at(&self.path));
                    }
                    r.1 = t.end;
                }
                (Some(_), false) => broken_by = broken_by.or(Some(&t.name)),
                (None, false) => {}
            }
        }
        Ok(range.or_else(|| {
            self.header
                .tensors
                .iter()
                .find(|t| t.dtype == dtype)
                .map(|t| (t.start, t.start))
        }))
    }
}

/// Reads the 8-byte prefix and the JSON header from the start of `reader` and validates
/// them for a file of `file_len` bytes. Only the header is read; the data section is
/// checked against `file_len` (its extent), not read.
pub fn read_header<R: Read>(reader: &mut R, file_len: u64) -> Result<Header, StoreErrorKind> {
    let mut prefix = [0u8; 8];
    let got = read_up_to(reader, &mut prefix).map_err(StoreErrorKind::Read)?;
    let n = header::header_len(&prefix[..got], file_len)?;
    let mut json = vec![0u8; n];
    reader
        .read_exact(&mut json)
        .map_err(StoreErrorKind::ReadHeader)?;
    Ok(header::parse(&json, file_len)?)
}

/// Validates a whole store file held in memory, exactly as [`MappedFile::open`] validates
/// a file on disk (the same checks on the same bytes; memory cannot fail to read), and
/// returns its header. On success every tensor's bytes,
/// `bytes[data_start + start..data_start + end]`, lie inside `bytes`, and together the
/// tensors cover the data section exactly.
pub fn validate_image(bytes: &[u8]) -> Result<Header, HeaderError> {
    let file_len = bytes.len() as u64;
    let n = header::header_len(&bytes[..bytes.len().min(8)], file_len)?;
    // `header_len` checked that the prefix and the JSON lie inside `bytes`.
    header::parse(&bytes[8..8 + n], file_len)
}

fn read_up_to<R: Read>(file: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Writes a file holding one f32 tensor (not durable).
    fn write_one_f32(path: &Path, name: &str, shape: &[usize], data: &[u8]) {
        let tensor = TensorRef {
            name,
            dtype: Dtype::F32,
            shape,
            data,
        };
        write_file(path, &[tensor], None, false).unwrap();
    }

    #[test]
    fn write_then_map_groups_by_dtype_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let w1 = f32_bytes(&[1.0, 2.0, 3.0]);
        let steps = 7i64.to_le_bytes();
        let w2 = f32_bytes(&[4.0]);
        let tensors = [
            TensorRef {
                name: "w1",
                dtype: Dtype::F32,
                shape: &[3],
                data: &w1,
            },
            TensorRef {
                name: "steps",
                dtype: Dtype::I64,
                shape: &[],
                data: &steps,
            },
            TensorRef {
                name: "w2",
                dtype: Dtype::F32,
                shape: &[1, 1],
                data: &w2,
            },
        ];
        let meta = vec![("k".to_string(), "v".to_string())];
        write_file(&path, &tensors, Some(&meta), true).unwrap();
        let m = MappedFile::open(&path).unwrap();
        let names: Vec<&str> = m.header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["steps", "w1", "w2"]);
        assert_eq!(m.header.data_start % header::DATA_ALIGNMENT, 0);
        assert_eq!(m.dtype_range(Dtype::F32).unwrap(), Some((8, 24)));
        assert_eq!(
            &m.data()[8..24],
            [w1.as_slice(), w2.as_slice()].concat().as_slice()
        );
        assert_eq!(m.header.metadata, Some(meta));
        assert_eq!(m.dtype_range(Dtype::F16).unwrap(), None);
        // no temp files left behind
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn private_mapping_does_not_write_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let b = f32_bytes(&[1.0; 4]);
        write_one_f32(&path, "x", &[4], &b);
        let before = fs::read(&path).unwrap();
        let mut m = MappedFile::open(&path).unwrap();
        // SAFETY: the data section holds 16 bytes and `m` is alive; the mapping is
        // private and writable.
        unsafe { *m.data_ptr() = 0xAB };
        assert_eq!(m.data()[0], 0xAB);
        drop(m);
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn rejects_bad_inputs_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let b = [0u8; 3];
        let e = write_file(
            &path,
            &[TensorRef {
                name: "x",
                dtype: Dtype::F32,
                shape: &[1],
                data: &b,
            }],
            None,
            false,
        )
        .unwrap_err();
        assert_eq!(e.path, path);
        assert!(
            matches!(
                &e.kind,
                StoreErrorKind::DataSize { name, given: 3, expected: 4, .. } if name == "x"
            ),
            "{e:?}"
        );
        let reserved = [TensorRef {
            name: "__metadata__",
            dtype: Dtype::U8,
            shape: &[0],
            data: &[],
        }];
        let e = write_file(&path, &reserved, None, false).unwrap_err();
        assert!(matches!(e.kind, StoreErrorKind::ReservedName), "{e:?}");
        let ok = [0u8; 4];
        let dup = [
            TensorRef {
                name: "x",
                dtype: Dtype::F32,
                shape: &[1],
                data: &ok,
            },
            TensorRef {
                name: "x",
                dtype: Dtype::F32,
                shape: &[1],
                data: &ok,
            },
        ];
        let e = write_file(&path, &dup, None, false).unwrap_err();
        assert!(
            matches!(&e.kind, StoreErrorKind::DuplicateName { name } if name == "x"),
            "{e:?}"
        );
        let missing_dir = dir.path().join("nope").join("f.safetensors");
        let e = write_file(&missing_dir, &[], None, false).unwrap_err();
        assert!(matches!(e.kind, StoreErrorKind::Write(_)), "{e:?}");
        // The message is the path, then what went wrong.
        assert!(
            e.to_string()
                .starts_with(&format!("{}: ", missing_dir.display())),
            "{e}"
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let b = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        write_one_f32(&path, "x", &[4], &b);
        let full = fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        for len in (0..full.len()).step_by(97).chain([full.len() - 1]) {
            fs::write(&cut, &full[..len]).unwrap();
            let e = MappedFile::open(&cut).err();
            assert!(
                matches!(
                    e,
                    Some(StoreError {
                        kind: StoreErrorKind::Header(_),
                        ..
                    })
                ),
                "truncated at {len}: {e:?}"
            );
        }
    }

    #[test]
    fn validate_image_agrees_with_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.safetensors");
        let b = f32_bytes(&[1.0, 2.0]);
        let steps = 3i64.to_le_bytes();
        let tensors = [
            TensorRef {
                name: "w",
                dtype: Dtype::F32,
                shape: &[2],
                data: &b,
            },
            TensorRef {
                name: "steps",
                dtype: Dtype::I64,
                shape: &[],
                data: &steps,
            },
        ];
        write_file(&path, &tensors, None, false).unwrap();
        let bytes = fs::read(&path).unwrap();
        let from_memory = validate_image(&bytes).unwrap();
        assert_eq!(from_memory, MappedFile::open(&path).unwrap().header);
        // Any change of length is caught the same way in memory and on disk.
        for len in [0, 7, 8, bytes.len() - 1] {
            let e = validate_image(&bytes[..len]).unwrap_err();
            fs::write(&path, &bytes[..len]).unwrap();
            let on_disk = MappedFile::open(&path).err().unwrap();
            match on_disk.kind {
                StoreErrorKind::Header(h) => assert_eq!(h, e),
                other => panic!("{other:?} vs {e:?}"),
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            validate_image(&longer),
            Err(HeaderError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn empty_data_section_needs_no_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        write_one_f32(&path, "e", &[0], &[]);
        let m = MappedFile::open(&path).unwrap();
        assert!(m.data().is_empty());
        assert_eq!(m.dtype_range(Dtype::F32).unwrap(), Some((0, 0)));
    }

    #[test]
    fn open_and_dtype_range_errors_say_which_failure() {
        let dir = tempfile::tempdir().unwrap();
        let e = MappedFile::open(&dir.path().join("absent")).err().unwrap();
        assert!(matches!(e.kind, StoreErrorKind::Open(_)), "{e:?}");
        let e = MappedFile::open(dir.path()).err().unwrap();
        assert!(
            matches!(
                e.kind,
                StoreErrorKind::NotAFile {
                    what: "a directory"
                }
            ),
            "{e:?}"
        );

        // Another writer may interleave dtypes; build such a file by hand.
        let infos = [
            TensorInfo {
                name: "a".into(),
                dtype: Dtype::F32,
                shape: vec![1],
                start: 0,
                end: 4,
            },
            TensorInfo {
                name: "b".into(),
                dtype: Dtype::I32,
                shape: vec![1],
                start: 4,
                end: 8,
            },
            TensorInfo {
                name: "c".into(),
                dtype: Dtype::F32,
                shape: vec![1],
                start: 8,
                end: 12,
            },
        ];
        let mut bytes = header::serialize(&infos, None);
        bytes.resize(bytes.len() + 12, 0);
        let path = dir.path().join("mixed.safetensors");
        fs::write(&path, &bytes).unwrap();
        let m = MappedFile::open(&path).unwrap();
        let e = m.dtype_range(Dtype::F32).unwrap_err();
        assert!(
            matches!(
                &e.kind,
                StoreErrorKind::NotContiguous { dtype: Dtype::F32, between } if between == "b"
            ),
            "{e:?}"
        );
        assert_eq!(m.dtype_range(Dtype::I32).unwrap(), Some((4, 8)));
    }

    /// Opens `path` on another thread and waits at most `secs` for the answer, so that an
    /// open that blocks fails the test instead of hanging it.
    fn open_within(path: &Path, secs: u64) -> Result<MappedFile, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(MappedFile::open(&p));
        });
        rx.recv_timeout(std::time::Duration::from_secs(secs))
            .unwrap_or_else(|_| panic!("opening {} blocked", path.display()))
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_or_a_device_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.safetensors");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = open_within(&fifo, 10).err().unwrap();
        assert!(
            matches!(e.kind, StoreErrorKind::NotAFile { what: "a FIFO" }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("{}: not a regular file (a FIFO)", fifo.display())
        );
        let null = Path::new("/dev/null");
        if null.exists() {
            let e = open_within(null, 10).err().unwrap();
            assert!(
                matches!(
                    e.kind,
                    StoreErrorKind::NotAFile {
                        what: "a character device"
                    }
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn small_files_are_read_and_large_ones_mapped_unless_copied() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.safetensors");
        let b = f32_bytes(&[1.5; 1024]);
        write_one_f32(&small, "x", &[1024], &b);
        let mut m = MappedFile::open(&small).unwrap();
        assert!(!m.is_mapped());
        assert_eq!(m.data(), b.as_slice());
        // A copy sits where a mapping would put the data section: page aligned here.
        assert_eq!(m.data_ptr() as usize % header::DATA_ALIGNMENT, 0);

        let large = dir.path().join("large.safetensors");
        let n = READ_MAX_BYTES / 4 + 1;
        let b: Vec<u8> = (0..n as u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        write_one_f32(&large, "x", &[n], &b);
        let m = MappedFile::open(&large).unwrap();
        assert!(m.is_mapped());
        assert_eq!(m.data(), b.as_slice());
        let mut c = MappedFile::open_with(&large, Access::Copy).unwrap();
        assert!(!c.is_mapped());
        assert_eq!(c.data(), b.as_slice());
        assert_eq!(c.data_ptr() as usize % header::DATA_ALIGNMENT, 0);
        assert_eq!(c.header, m.header);
    }

    #[test]
    fn a_copy_keeps_the_alignment_a_mapping_would_have() {
        // Another writer's header need not end on a page boundary: the data section of
        // this file starts 8 + 61 bytes in.
        let json = br#"{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json);
        bytes.extend_from_slice(&[7, 8, 9]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("packed.safetensors");
        fs::write(&path, &bytes).unwrap();
        let mut m = MappedFile::open(&path).unwrap();
        assert_eq!(m.data(), [7, 8, 9]);
        let data_start = 8 + json.len();
        assert_eq!(
            m.data_ptr() as usize % header::DATA_ALIGNMENT,
            data_start % header::DATA_ALIGNMENT
        );
    }

    #[test]
    fn read_files_keep_their_bytes_when_the_file_is_truncated() {
        // A mapped page past a truncated file's new end raises SIGBUS when read: the
        // small file and the copied large one must not be mapped at all.
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.safetensors");
        let b = f32_bytes(&[2.5; 4096]);
        write_one_f32(&small, "x", &[4096], &b);
        let large = dir.path().join("large.safetensors");
        let n = READ_MAX_BYTES / 4 * 2;
        let big = f32_bytes(&vec![3.5; n]);
        write_one_f32(&large, "x", &[n], &big);
        let m = MappedFile::open(&small).unwrap();
        let c = MappedFile::open_with(&large, Access::Copy).unwrap();
        for p in [&small, &large] {
            OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
        assert_eq!(m.data(), b.as_slice());
        assert_eq!(c.data(), big.as_slice());
    }

    #[test]
    fn writes_refuse_what_reads_would_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let shape = [1usize; header::MAX_NDIM + 1];
        let e = write_file(
            &path,
            &[TensorRef {
                name: "deep",
                dtype: Dtype::U8,
                shape: &shape,
                data: &[0],
            }],
            None,
            false,
        )
        .unwrap_err();
        assert!(
            matches!(
                &e.kind,
                StoreErrorKind::Header(HeaderError::TooManyDims { name, ndim: 65 }) if name == "deep"
            ),
            "{e:?}"
        );
        let e = write_file(
            &path,
            &[TensorRef {
                name: "wide",
                dtype: Dtype::F32,
                shape: &[0, 1 << 62],
                data: &[],
            }],
            None,
            false,
        )
        .unwrap_err();
        assert!(
            matches!(
                &e.kind,
                StoreErrorKind::Header(HeaderError::ShapeOverflow { .. })
            ),
            "{e:?}"
        );
        let big = vec![("k".to_string(), "x".repeat(header::MAX_METADATA_BYTES))];
        let e = write_file(&path, &[], Some(&big), false).unwrap_err();
        assert!(
            matches!(
                e.kind,
                StoreErrorKind::Header(HeaderError::MetadataTooLarge { bytes })
                    if bytes == header::MAX_METADATA_BYTES + 1
            ),
            "{e:?}"
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

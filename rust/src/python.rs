//! The `emberfl._core` Python module: thin, typed wrappers over the store and the
//! kernels. Heavy work runs with the GIL released; every error becomes a Python
//! exception (`StoreError`, `NonFiniteError`, `ValueError`, `TypeError`).

use std::os::raw::{c_int, c_void};
use std::path::PathBuf;

use half::{bf16, f16};
use numpy::npyffi::{self, npy_intp, NpyTypes, NPY_ARRAY_WRITEABLE, NPY_TYPES, PY_ARRAY_API};
use numpy::{PyArrayDescrMethods, PyReadwriteArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::dtype::Dtype;
use crate::kernels::{self, Input, KernelError};
use crate::header::TensorInfo;
use crate::store::{self, StoreError as RustStoreError, TensorRef};

pyo3::create_exception!(
    emberfl.store,
    StoreError,
    PyValueError,
    "A store file could not be written, or is not a valid safetensors file."
);
pyo3::create_exception!(
    emberfl.aggregate,
    NonFiniteError,
    PyValueError,
    "An aggregation met NaN or Inf values."
);

fn store_err(e: RustStoreError) -> PyErr {
    StoreError::new_err(e.0)
}

fn kernel_err(e: KernelError) -> PyErr {
    match e {
        KernelError::NonFinite { .. } => NonFiniteError::new_err(e.to_string()),
        other => PyValueError::new_err(other.to_string()),
    }
}

/// A raw, GIL-free view of a 1-D contiguous numpy array: (address, length in items).
/// The array object is kept alive by the caller for as long as the view is used.
#[derive(Clone, Copy)]
struct RawVec {
    addr: usize,
    len: usize,
}

fn raw_vec(arr: &Bound<'_, PyUntypedArray>, itemsize: usize, what: &str) -> PyResult<RawVec> {
    if arr.ndim() != 1 {
        return Err(PyValueError::new_err(format!("{what}: expected a 1-D array, got {} dims", arr.ndim())));
    }
    let got = arr.dtype().itemsize();
    if got != itemsize {
        return Err(PyTypeError::new_err(format!("{what}: expected {itemsize}-byte items, got {got}-byte items")));
    }
    let len = arr.len();
    if len > 1 && !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{what}: array must be contiguous")));
    }
    // SAFETY: reading the data pointer field of a live array object.
    let addr = unsafe { (*arr.as_array_ptr()).fields.data } as usize;
    if len > 0 && addr % itemsize != 0 {
        return Err(PyValueError::new_err(format!("{what}: data is not aligned to its item size")));
    }
    Ok(RawVec { addr, len })
}

/// Rebuilds typed slices from raw views. SAFETY: caller guarantees the arrays are
/// alive, contiguous, aligned and of the element type named by `kind`.
unsafe fn inputs_from_raw(raws: &[RawVec], kind: &str) -> Vec<Input<'static>> {
    raws.iter()
        .map(|r| {
            let nonnull = if r.len == 0 { std::ptr::NonNull::<u64>::dangling().as_ptr() as usize } else { r.addr };
            unsafe {
                match kind {
                    "f32" => Input::F32(std::slice::from_raw_parts(nonnull as *const f32, r.len)),
                    "f16" => Input::F16(std::slice::from_raw_parts(nonnull as *const f16, r.len)),
                    _ => Input::BF16(std::slice::from_raw_parts(nonnull as *const bf16, r.len)),
                }
            }
        })
        .collect()
}

fn kind_itemsize(kind: &str) -> PyResult<usize> {
    match kind {
        "f32" => Ok(4),
        "f16" | "bf16" => Ok(2),
        other => Err(PyTypeError::new_err(format!("unsupported input dtype {other:?}; expected f32, f16 or bf16"))),
    }
}

fn collect_inputs(inputs: &[Bound<'_, PyUntypedArray>], kind: &str) -> PyResult<Vec<RawVec>> {
    let itemsize = kind_itemsize(kind)?;
    inputs
        .iter()
        .enumerate()
        .map(|(i, a)| raw_vec(a, itemsize, &format!("inputs[{i}]")))
        .collect()
}

fn overlaps(a: RawVec, a_item: usize, b: RawVec, b_item: usize) -> bool {
    let (a0, a1) = (a.addr, a.addr + a.len * a_item);
    let (b0, b1) = (b.addr, b.addr + b.len * b_item);
    a.len > 0 && b.len > 0 && a0 < b1 && b0 < a1
}

#[pyfunction]
#[pyo3(signature = (inputs, kind, weights, out, threads=1, check_finite=true, normalize=true))]
#[allow(clippy::too_many_arguments)]
fn weighted_sum(
    py: Python<'_>,
    inputs: Vec<Bound<'_, PyUntypedArray>>,
    kind: &str,
    weights: Vec<f64>,
    mut out: PyReadwriteArray1<'_, f32>,
    threads: usize,
    check_finite: bool,
    normalize: bool,
) -> PyResult<()> {
    let raws = collect_inputs(&inputs, kind)?;
    let item = kind_itemsize(kind)?;
    let out_slice = out
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("out must be contiguous"))?;
    let out_raw = RawVec { addr: out_slice.as_ptr() as usize, len: out_slice.len() };
    if raws.iter().any(|r| overlaps(*r, item, out_raw, 4)) {
        return Err(PyValueError::new_err("out must not overlap any input"));
    }
    let kind = kind.to_owned();
    py.detach(move || {
        // SAFETY: `inputs` and `out` stay borrowed by this frame while the GIL is released.
        let ins = unsafe { inputs_from_raw(&raws, &kind) };
        let out = unsafe { std::slice::from_raw_parts_mut(out_raw.addr as *mut f32, out_raw.len) };
        kernels::weighted_sum(&ins, &weights, normalize, out, threads, check_finite)
    })
    .map_err(kernel_err)
}

#[pyfunction]
#[pyo3(signature = (acc, x, kind, weight, threads=1))]
fn accumulate(
    py: Python<'_>,
    mut acc: PyReadwriteArray1<'_, f32>,
    x: Bound<'_, PyUntypedArray>,
    kind: &str,
    weight: f64,
    threads: usize,
) -> PyResult<()> {
    let raw = collect_inputs(std::slice::from_ref(&x), kind)?[0];
    let item = kind_itemsize(kind)?;
    let acc_slice = acc
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("acc must be contiguous"))?;
    let acc_raw = RawVec { addr: acc_slice.as_ptr() as usize, len: acc_slice.len() };
    if overlaps(raw, item, acc_raw, 4) {
        return Err(PyValueError::new_err("acc must not overlap x"));
    }
    let kind = kind.to_owned();
    py.detach(move || {
        // SAFETY: as in `weighted_sum`.
        let ins = unsafe { inputs_from_raw(&[raw], &kind) };
        let acc = unsafe { std::slice::from_raw_parts_mut(acc_raw.addr as *mut f32, acc_raw.len) };
        kernels::accumulate(acc, ins[0], weight, threads)
    })
    .map_err(kernel_err)
}

#[pyfunction]
#[pyo3(signature = (inputs, kind, threads=1))]
fn find_nonfinite(py: Python<'_>, inputs: Vec<Bound<'_, PyUntypedArray>>, kind: &str, threads: usize) -> PyResult<Vec<usize>> {
    let raws = collect_inputs(&inputs, kind)?;
    let kind = kind.to_owned();
    Ok(py.detach(move || {
        // SAFETY: as in `weighted_sum`.
        let ins = unsafe { inputs_from_raw(&raws, &kind) };
        kernels::find_nonfinite(&ins, threads)
    }))
}

/// Writes a store file. `buffers[i]` holds tensor i's bytes as a 1-D uint8 array.
#[pyfunction]
#[pyo3(signature = (path, names, dtypes, shapes, buffers, metadata=None, durable=false))]
#[allow(clippy::too_many_arguments)]
fn save_file(
    py: Python<'_>,
    path: PathBuf,
    names: Vec<String>,
    dtypes: Vec<String>,
    shapes: Vec<Vec<usize>>,
    buffers: Vec<Bound<'_, PyUntypedArray>>,
    metadata: Option<Vec<(String, String)>>,
    durable: bool,
) -> PyResult<()> {
    let n = names.len();
    if dtypes.len() != n || shapes.len() != n || buffers.len() != n {
        return Err(PyValueError::new_err("names, dtypes, shapes and buffers must have the same length"));
    }
    let mut parsed = Vec::with_capacity(n);
    for (name, d) in names.iter().zip(&dtypes) {
        parsed.push(Dtype::parse(d).ok_or_else(|| {
            StoreError::new_err(format!("{}: tensor {name:?}: unsupported dtype {d:?}", path.display()))
        })?);
    }
    let raws = buffers
        .iter()
        .zip(&names)
        .map(|(b, name)| raw_vec(b, 1, &format!("tensor {name:?}")))
        .collect::<PyResult<Vec<_>>>()?;
    py.detach(move || {
        let tensors: Vec<TensorRef<'_>> = (0..n)
            .map(|i| TensorRef {
                name: &names[i],
                dtype: parsed[i],
                shape: &shapes[i],
                // SAFETY: the byte arrays stay referenced by this frame during the write.
                data: if raws[i].len == 0 {
                    &[]
                } else {
                    unsafe { std::slice::from_raw_parts(raws[i].addr as *const u8, raws[i].len) }
                },
            })
            .collect();
        store::write_file(&path, &tensors, metadata.as_deref(), durable)
    })
    .map_err(store_err)
}

/// The numpy element type that holds a dtype's items; bfloat16 has none and travels as
/// its raw uint16 bits.
fn npy_type(d: Dtype) -> NPY_TYPES {
    match d {
        Dtype::F64 => NPY_TYPES::NPY_DOUBLE,
        Dtype::F32 => NPY_TYPES::NPY_FLOAT,
        Dtype::F16 => NPY_TYPES::NPY_HALF,
        Dtype::BF16 => NPY_TYPES::NPY_USHORT,
        // numpy's int64 is C long on LP64 platforms and long long elsewhere.
        Dtype::I64 if std::mem::size_of::<std::os::raw::c_long>() == 8 => NPY_TYPES::NPY_LONG,
        Dtype::I64 => NPY_TYPES::NPY_LONGLONG,
        Dtype::I32 => NPY_TYPES::NPY_INT,
        Dtype::I16 => NPY_TYPES::NPY_SHORT,
        Dtype::I8 => NPY_TYPES::NPY_BYTE,
        Dtype::U8 => NPY_TYPES::NPY_UBYTE,
        Dtype::Bool => NPY_TYPES::NPY_BOOL,
    }
}

/// A validated, privately mapped store file.
#[pyclass(name = "MappedFile", module = "emberfl._core", frozen)]
struct PyMappedFile {
    inner: store::MappedFile,
    data_addr: usize,
}

#[pymethods]
impl PyMappedFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let mut mapped = py.detach(|| store::MappedFile::open(&path)).map_err(store_err)?;
        let data_addr = mapped.data_ptr() as usize;
        Ok(PyMappedFile { inner: mapped, data_addr })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// `__metadata__` as a dict (empty when the file has none).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let inner = &self.inner;
        for (k, v) in inner.header.metadata.iter().flatten() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// `(name, dtype, shape, start, end)` per tensor, in file order; offsets are
    /// relative to the data section.
    fn entries(&self) -> Vec<(String, String, Vec<usize>, usize, usize)> {
        let inner = &self.inner;
        inner
            .header
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype.name().to_owned(), t.shape.clone(), t.start, t.end))
            .collect()
    }

    /// One typed, shaped numpy array per tensor, in file order: writable views of the
    /// private mapping that keep this object alive. bfloat16 tensors come as uint16
    /// arrays of their bits. Tensors that are empty, or not aligned to their item size
    /// (possible in files written by other tools), come as copies.
    fn arrays<'py>(slf: &Bound<'py, Self>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        slf.get().inner.header.tensors.iter().map(|t| tensor_array(slf, t)).collect()
    }

    /// One 1-D array over every tensor of `dtype`, in file order (a view, or a copy
    /// under the same rules as `arrays`). Raises `StoreError` when those tensors are
    /// not one contiguous range; empty when the file has none.
    fn flat<'py>(slf: &Bound<'py, Self>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
        let d = Dtype::parse(dtype).ok_or_else(|| StoreError::new_err(format!("unsupported dtype {dtype:?}")))?;
        let (start, end) = slf.get().inner.dtype_range(d).map_err(store_err)?.unwrap_or((0, 0));
        let span = TensorInfo {
            name: String::new(),
            dtype: d,
            shape: vec![(end - start) / d.itemsize()],
            start,
            end,
        };
        tensor_array(slf, &span)
    }
}

/// A numpy array of tensor `t` of `owner`'s file (see `PyMappedFile::arrays`).
fn tensor_array<'py>(owner: &Bound<'py, PyMappedFile>, t: &TensorInfo) -> PyResult<Bound<'py, PyAny>> {
    let py = owner.py();
    let this = owner.get();
    let mut dims: Vec<npy_intp> = t.shape.iter().map(|&d| d as npy_intp).collect();
    let nd = dims.len() as c_int;
    let view = t.end > t.start && t.start % t.dtype.itemsize() == 0;
    // SAFETY: `descr` is a new reference that NewFromDescr steals. A view's memory is
    // `t.end - t.start` bytes inside the validated data section, which lives as long as
    // `owner`, set as the array's base (SetBaseObject steals the reference we pass).
    // An owned array is allocated by numpy with exactly the tensor's byte size.
    unsafe {
        let subtype = npyffi::get_type_object(py, NpyTypes::PyArray_Type);
        let descr = PY_ARRAY_API.PyArray_DescrFromType(py, npy_type(t.dtype) as c_int);
        if descr.is_null() {
            return Err(PyErr::fetch(py));
        }
        let (data, flags) = if view {
            ((this.data_addr + t.start) as *mut c_void, NPY_ARRAY_WRITEABLE)
        } else {
            (std::ptr::null_mut(), 0)
        };
        let ptr = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            subtype,
            descr,
            nd,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data,
            flags,
            std::ptr::null_mut(),
        );
        let array = Bound::from_owned_ptr_or_err(py, ptr)?;
        if view {
            let base = owner.clone().into_any().into_ptr();
            if PY_ARRAY_API.PyArray_SetBaseObject(py, ptr.cast(), base) < 0 {
                return Err(PyErr::fetch(py));
            }
        } else if t.end > t.start {
            let fields = ptr.cast::<npyffi::PyArrayObject_fields>();
            let src = this.inner.data()[t.start..t.end].as_ptr();
            std::ptr::copy_nonoverlapping(src, (*fields).data.cast::<u8>(), t.end - t.start);
        }
        Ok(array)
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("StoreError", m.py().get_type::<StoreError>())?;
    m.add("NonFiniteError", m.py().get_type::<NonFiniteError>())?;
    m.add_class::<PyMappedFile>()?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    m.add_function(wrap_pyfunction!(weighted_sum, m)?)?;
    m.add_function(wrap_pyfunction!(accumulate, m)?)?;
    m.add_function(wrap_pyfunction!(find_nonfinite, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

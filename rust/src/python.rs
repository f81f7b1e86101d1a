//! The `emberfl._core` Python module: thin, typed wrappers over the store and the
//! kernels. Arrays arrive as typed numpy arrays whose dtype is checked against what
//! the call expects; heavy work runs with the GIL released over plain slices of them;
//! every error becomes a Python exception (`StoreError`, `NonFiniteError`,
//! `ValueError`, `TypeError`).

use std::ops::Range;
use std::os::raw::{c_int, c_void};
use std::path::PathBuf;

use half::f16;
use half::slice::HalfBitsSliceExt;
use numpy::npyffi::{self, npy_intp, NpyTypes, NPY_ARRAY_WRITEABLE, NPY_TYPES, PY_ARRAY_API};
use numpy::{
    Element, PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::dtype::Dtype;
use crate::exact::{self, ExactError};
use crate::header::TensorInfo;
use crate::kernels::{self, Input, KernelError};
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

pyo3::create_exception!(
    emberfl.aggregate,
    OutOfRangeError,
    PyValueError,
    "An exact sum met a term, a count or a mean beyond its range."
);

fn store_err(e: RustStoreError) -> PyErr {
    StoreError::new_err(e.to_string())
}

fn kernel_err(e: KernelError) -> PyErr {
    match e {
        KernelError::NonFinite { .. } => NonFiniteError::new_err(e.to_string()),
        other => PyValueError::new_err(other.to_string()),
    }
}

fn exact_err(e: ExactError) -> PyErr {
    match e {
        ExactError::NonFinite { .. } => NonFiniteError::new_err(e.to_string()),
        ExactError::TermOutOfRange { .. }
        | ExactError::MeanOutOfRange { .. }
        | ExactError::TooManyAdds { .. } => OutOfRangeError::new_err(e.to_string()),
        other => PyValueError::new_err(other.to_string()),
    }
}

/// The element type of the kernels' inputs, given as the `kind` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F32,
    F16,
    /// numpy has no bfloat16: these inputs come as uint16 arrays of the bits.
    BF16,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::F32 => "f32",
            Kind::F16 => "f16",
            Kind::BF16 => "bf16",
        }
    }
}

impl FromPyObject<'_, '_> for Kind {
    type Error = PyErr;

    fn extract(obj: Borrowed<'_, '_, PyAny>) -> PyResult<Self> {
        match obj.cast::<PyString>()?.to_str()? {
            "f32" => Ok(Kind::F32),
            "f16" => Ok(Kind::F16),
            "bf16" => Ok(Kind::BF16),
            other => Err(PyTypeError::new_err(format!(
                "unsupported input dtype {other:?}; expected f32, f16 or bf16"
            ))),
        }
    }
}

/// `obj` as a 1-D numpy array of `T`, or an error naming `what`, the dtype expected
/// (for `kind` when given) and the one given. A dtype is checked for equivalence, so
/// byte-swapped arrays are rejected too.
fn typed_array<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    kind: Option<Kind>,
) -> PyResult<Bound<'py, PyArray1<T>>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        let got = obj
            .get_type()
            .name()
            .map_or_else(|_| "?".into(), |n| n.to_string());
        PyTypeError::new_err(format!("{what}: expected a numpy array, got {got}"))
    })?;
    if arr.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{what}: expected a 1-D array, got {} dims",
            arr.ndim()
        )));
    }
    let want = numpy::dtype::<T>(obj.py());
    let got = arr.dtype();
    if !got.is_equiv_to(&want) {
        let context = match kind {
            Some(Kind::BF16) => " (bfloat16 bits) for kind \"bf16\"".to_owned(),
            Some(k) => format!(" for kind {:?}", k.name()),
            None => String::new(),
        };
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a {want} array{context}, got {got}"
        )));
    }
    Ok(arr.cast::<PyArray1<T>>()?.clone())
}

/// A readonly borrow of `obj` as a 1-D array of `T` (see [`typed_array`]).
fn readonly<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    kind: Option<Kind>,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    typed_array::<T>(obj, what, kind)?
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// The elements of a borrowed array as one slice: it must be contiguous and aligned.
fn as_slice<'a, T: Element>(a: &'a PyReadonlyArray1<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| not_a_slice(a.as_untyped(), what))
}

fn not_a_slice(a: &Bound<'_, PyUntypedArray>, what: &str) -> PyErr {
    PyValueError::new_err(if a.is_contiguous() {
        format!("{what}: data is not aligned to its item size")
    } else {
        format!("{what}: array must be contiguous")
    })
}

/// A kernel input borrowed from Python, typed by its kind.
enum InputArray<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    F16(PyReadonlyArray1<'py, f16>),
    BF16(PyReadonlyArray1<'py, u16>),
}

impl<'py> InputArray<'py> {
    fn borrow(obj: &Bound<'py, PyAny>, kind: Kind, what: &str) -> PyResult<Self> {
        let k = Some(kind);
        Ok(match kind {
            Kind::F32 => InputArray::F32(readonly(obj, what, k)?),
            Kind::F16 => InputArray::F16(readonly(obj, what, k)?),
            Kind::BF16 => InputArray::BF16(readonly(obj, what, k)?),
        })
    }

    /// The slice the kernels read; bfloat16 bits are reinterpreted by `half`'s safe cast.
    fn input(&self, what: &str) -> PyResult<Input<'_>> {
        Ok(match self {
            InputArray::F32(a) => Input::F32(as_slice(a, what)?),
            InputArray::F16(a) => Input::F16(as_slice(a, what)?),
            InputArray::BF16(a) => Input::BF16(as_slice(a, what)?.reinterpret_cast()),
        })
    }
}

/// Borrows every input as `kind`.
fn borrow_inputs<'py>(inputs: &[Bound<'py, PyAny>], kind: Kind) -> PyResult<Vec<InputArray<'py>>> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, a)| InputArray::borrow(a, kind, &format!("inputs[{i}]")))
        .collect()
}

fn input_slices<'a>(arrays: &'a [InputArray<'_>]) -> PyResult<Vec<Input<'a>>> {
    arrays
        .iter()
        .enumerate()
        .map(|(i, a)| a.input(&format!("inputs[{i}]")))
        .collect()
}

/// The addresses of a slice's bytes.
fn span<T>(s: &[T]) -> Range<usize> {
    let r = s.as_ptr_range();
    r.start as usize..r.end as usize
}

fn input_span(x: &Input<'_>) -> Range<usize> {
    match x {
        Input::F32(s) => span(s),
        Input::F16(s) => span(s),
        Input::BF16(s) => span(s),
    }
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// Borrows the f32 output array `obj` for writing once it is known not to overlap any of
/// `inputs`, which are borrowed for reading already (and which numpy's own borrow
/// tracking only relates to `obj` when both view the same base object).
fn borrow_output<'py>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    inputs: &[Input<'_>],
    overlap_msg: &str,
) -> PyResult<PyReadwriteArray1<'py, f32>> {
    let arr = typed_array::<f32>(obj, what, None)?;
    if !arr.is_contiguous() {
        return Err(not_a_slice(arr.as_untyped(), what));
    }
    let start = arr.data() as usize;
    let out = start..start + arr.len() * std::mem::size_of::<f32>();
    if inputs.iter().any(|x| overlaps(&input_span(x), &out)) {
        return Err(PyValueError::new_err(overlap_msg.to_owned()));
    }
    arr.try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

#[pyfunction]
#[pyo3(signature = (inputs, kind, weights, out, threads=1, check_finite=true, normalize=true))]
#[allow(clippy::too_many_arguments)]
fn weighted_sum(
    py: Python<'_>,
    inputs: Vec<Bound<'_, PyAny>>,
    kind: Kind,
    weights: Vec<f64>,
    out: Bound<'_, PyAny>,
    threads: usize,
    check_finite: bool,
    normalize: bool,
) -> PyResult<()> {
    let arrays = borrow_inputs(&inputs, kind)?;
    let ins = input_slices(&arrays)?;
    let mut out = borrow_output(&out, "out", &ins, "out must not overlap any input")?;
    let out = out
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("out: data is not aligned to its item size"))?;
    py.detach(|| kernels::weighted_sum(&ins, &weights, normalize, out, threads, check_finite))
        .map_err(kernel_err)
}

#[pyfunction]
#[pyo3(signature = (acc, x, kind, weight, threads=1))]
fn accumulate(
    py: Python<'_>,
    acc: Bound<'_, PyAny>,
    x: Bound<'_, PyAny>,
    kind: Kind,
    weight: f64,
    threads: usize,
) -> PyResult<()> {
    let array = InputArray::borrow(&x, kind, "x")?;
    let x = array.input("x")?;
    let mut acc = borrow_output(&acc, "acc", &[x], "acc must not overlap x")?;
    let acc = acc
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("acc: data is not aligned to its item size"))?;
    py.detach(|| kernels::accumulate(acc, x, weight, threads))
        .map_err(kernel_err)
}

#[pyfunction]
#[pyo3(signature = (inputs, kind, threads=1))]
fn find_nonfinite(
    py: Python<'_>,
    inputs: Vec<Bound<'_, PyAny>>,
    kind: Kind,
    threads: usize,
) -> PyResult<Vec<usize>> {
    let arrays = borrow_inputs(&inputs, kind)?;
    let ins = input_slices(&arrays)?;
    Ok(py.detach(|| kernels::find_nonfinite(&ins, threads)))
}

const _: () = assert!(exact::DEFAULT_GRID == 64);

/// An exact, order-independent weighted sum (`crate::exact`). Its work runs with the
/// GIL released; a second thread using the same object meanwhile gets a borrow error.
#[pyclass(name = "ExactSum", module = "emberfl._core")]
struct PyExactSum {
    inner: exact::ExactSum,
}

#[pymethods]
impl PyExactSum {
    // A literal, so that Python's signature shows it; the assertion keeps it in step.
    #[new]
    #[pyo3(signature = (length, grid=64))]
    fn new(length: usize, grid: u32) -> PyResult<Self> {
        Ok(PyExactSum {
            inner: exact::ExactSum::new(length, grid).map_err(exact_err)?,
        })
    }

    /// `data`: a 1-D uint8 array of the byte format (read in place).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: Bound<'_, PyAny>) -> PyResult<Self> {
        let array = readonly::<u8>(&data, "data", None)?;
        let bytes = as_slice(&array, "data")?;
        let inner = py
            .detach(|| exact::ExactSum::from_bytes(bytes))
            .map_err(exact_err)?;
        Ok(PyExactSum { inner })
    }

    /// Adds the sum that `data` (a 1-D uint8 array of the byte format) holds, in place.
    #[pyo3(signature = (data, threads=1))]
    fn merge_bytes(
        &mut self,
        py: Python<'_>,
        data: Bound<'_, PyAny>,
        threads: usize,
    ) -> PyResult<()> {
        let array = readonly::<u8>(&data, "data", None)?;
        let bytes = as_slice(&array, "data")?;
        let inner = &mut self.inner;
        py.detach(|| inner.merge_bytes(bytes, threads))
            .map_err(exact_err)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn grid(&self) -> u32 {
        self.inner.grid()
    }

    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    /// The exact total weight in units of 2^-64.
    #[getter]
    fn weight_units(&self) -> i128 {
        self.inner.weight_units()
    }

    #[getter]
    fn term_limit(&self) -> f64 {
        self.inner.term_limit()
    }

    #[pyo3(signature = (x, kind, weight, threads=1))]
    fn add(
        &mut self,
        py: Python<'_>,
        x: Bound<'_, PyAny>,
        kind: Kind,
        weight: f64,
        threads: usize,
    ) -> PyResult<()> {
        let array = InputArray::borrow(&x, kind, "x")?;
        let x = array.input("x")?;
        let inner = &mut self.inner;
        py.detach(|| inner.add(x, weight, threads))
            .map_err(exact_err)
    }

    #[pyo3(signature = (other, threads=1))]
    fn merge(slf: &Bound<'_, Self>, other: &Bound<'_, Self>, threads: usize) -> PyResult<()> {
        let py = slf.py();
        // Merging a sum into itself doubles it: merge a copy, as two borrows would clash.
        let copy = slf.is(other).then(|| other.borrow().inner.clone());
        let other_ref = if copy.is_none() {
            Some(other.try_borrow()?)
        } else {
            None
        };
        let src = copy
            .as_ref()
            .or(other_ref.as_ref().map(|o| &o.inner))
            .expect("one of the two is set");
        let mut me = slf.try_borrow_mut()?;
        let inner = &mut me.inner;
        py.detach(|| inner.merge(src, threads)).map_err(exact_err)
    }

    // The output is allocated by numpy, which advises huge pages for large arrays: a plain
    // Vec's first touch page by page costs more than the rounding.
    #[pyo3(signature = (threads=1))]
    fn finish<'py>(&self, py: Python<'py>, threads: usize) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let array = PyArray1::<f32>::zeros(py, self.inner.len(), false);
        let mut rw = array.readwrite();
        let out = rw.as_slice_mut().expect("a new array is contiguous");
        let inner = &self.inner;
        py.detach(|| inner.finish_into(out, threads))
            .map_err(exact_err)?;
        drop(rw);
        Ok(array)
    }

    #[pyo3(signature = (threads=1))]
    fn finish_sum<'py>(
        &self,
        py: Python<'py>,
        threads: usize,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let array = PyArray1::<f32>::zeros(py, self.inner.len(), false);
        let mut rw = array.readwrite();
        let out = rw.as_slice_mut().expect("a new array is contiguous");
        let inner = &self.inner;
        py.detach(|| inner.finish_sum_into(out, threads))
            .map_err(exact_err)?;
        drop(rw);
        Ok(array)
    }

    /// The byte format as a new 1-D uint8 array.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let array = PyArray1::<u8>::zeros(py, self.inner.byte_len(), false);
        let mut rw = array.readwrite();
        let out = rw.as_slice_mut().expect("a new array is contiguous");
        let inner = &self.inner;
        py.detach(|| inner.write_bytes(out));
        drop(rw);
        Ok(array)
    }
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
    buffers: Vec<Bound<'_, PyAny>>,
    metadata: Option<Vec<(String, String)>>,
    durable: bool,
) -> PyResult<()> {
    let n = names.len();
    if dtypes.len() != n || shapes.len() != n || buffers.len() != n {
        return Err(PyValueError::new_err(
            "names, dtypes, shapes and buffers must have the same length",
        ));
    }
    let mut parsed = Vec::with_capacity(n);
    for (name, d) in names.iter().zip(&dtypes) {
        parsed.push(Dtype::parse(d).ok_or_else(|| {
            StoreError::new_err(format!(
                "{}: tensor {name:?}: unsupported dtype {d:?}",
                path.display()
            ))
        })?);
    }
    let arrays = buffers
        .iter()
        .zip(&names)
        .map(|(b, name)| readonly::<u8>(b, &format!("tensor {name:?}"), None))
        .collect::<PyResult<Vec<_>>>()?;
    let tensors = arrays
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Ok(TensorRef {
                name: &names[i],
                dtype: parsed[i],
                shape: &shapes[i],
                data: as_slice(a, &format!("tensor {:?}", names[i]))?,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    py.detach(|| store::write_file(&path, &tensors, metadata.as_deref(), durable))
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

/// A validated store file: privately mapped, or read into memory (files up to
/// `store::READ_MAX_BYTES`, and any file opened with `copy=True`).
#[pyclass(name = "MappedFile", module = "emberfl._core", frozen)]
struct PyMappedFile {
    inner: store::MappedFile,
    data_addr: usize,
}

#[pymethods]
impl PyMappedFile {
    #[new]
    #[pyo3(signature = (path, copy=false))]
    fn new(py: Python<'_>, path: PathBuf, copy: bool) -> PyResult<Self> {
        let access = if copy {
            store::Access::Copy
        } else {
            store::Access::Auto
        };
        let mut mapped = py
            .detach(|| store::MappedFile::open_with(&path, access))
            .map_err(store_err)?;
        let data_addr = mapped.data_ptr() as usize;
        Ok(PyMappedFile {
            inner: mapped,
            data_addr,
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// Whether the tensors are views of a mapping of the file (not of a copy in memory).
    #[getter]
    fn mapped(&self) -> bool {
        self.inner.is_mapped()
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
            .map(|t| {
                (
                    t.name.clone(),
                    t.dtype.name().to_owned(),
                    t.shape.clone(),
                    t.start,
                    t.end,
                )
            })
            .collect()
    }

    /// One typed, shaped numpy array per tensor, in file order: writable views of the
    /// private mapping that keep this object alive. bfloat16 tensors come as uint16
    /// arrays of their bits. Tensors that are empty, or not aligned to their item size
    /// (possible in files written by other tools), come as copies.
    fn arrays<'py>(slf: &Bound<'py, Self>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        slf.get()
            .inner
            .header
            .tensors
            .iter()
            .map(|t| tensor_array(slf, t))
            .collect()
    }

    /// One 1-D array over every tensor of `dtype`, in file order (a view, or a copy
    /// under the same rules as `arrays`). Raises `StoreError` when those tensors are
    /// not one contiguous range; empty when the file has none.
    fn flat<'py>(slf: &Bound<'py, Self>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
        let d = Dtype::parse(dtype)
            .ok_or_else(|| StoreError::new_err(format!("unsupported dtype {dtype:?}")))?;
        let (start, end) = slf
            .get()
            .inner
            .dtype_range(d)
            .map_err(store_err)?
            .unwrap_or((0, 0));
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

/// numpy's refusal of a shape the validator let through (numpy 1 allows 32 dimensions,
/// not 64) as a `StoreError` naming the file and the tensor; other errors as they are.
fn numpy_refused(owner: &Bound<'_, PyMappedFile>, t: &TensorInfo, e: PyErr) -> PyErr {
    if !e.is_instance_of::<PyValueError>(owner.py()) {
        return e;
    }
    let path = owner.get().inner.path.display().to_string();
    let why = e.value(owner.py());
    StoreError::new_err(format!("{path}: tensor {:?}: {why}", t.name))
}

/// A numpy array of tensor `t` of `owner`'s file (see `PyMappedFile::arrays`).
fn tensor_array<'py>(
    owner: &Bound<'py, PyMappedFile>,
    t: &TensorInfo,
) -> PyResult<Bound<'py, PyAny>> {
    let py = owner.py();
    let this = owner.get();
    let mut dims: Vec<npy_intp> = t.shape.iter().map(|&d| d as npy_intp).collect();
    let nd = dims.len() as c_int;
    let view = t.end > t.start && t.start.is_multiple_of(t.dtype.itemsize());
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
            (
                (this.data_addr + t.start) as *mut c_void,
                NPY_ARRAY_WRITEABLE,
            )
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
        let array =
            Bound::from_owned_ptr_or_err(py, ptr).map_err(|e| numpy_refused(owner, t, e))?;
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
    m.add("OutOfRangeError", m.py().get_type::<OutOfRangeError>())?;
    m.add_class::<PyExactSum>()?;
    m.add_class::<PyMappedFile>()?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    m.add_function(wrap_pyfunction!(weighted_sum, m)?)?;
    m.add_function(wrap_pyfunction!(accumulate, m)?)?;
    m.add_function(wrap_pyfunction!(find_nonfinite, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

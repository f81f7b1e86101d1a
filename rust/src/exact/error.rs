//! The typed errors of exact sums: refused inputs and corrupt bytes.

use std::fmt;

use super::{HEADER_LEN, MAX_ADDS, MAX_GRID, VERSION};

/// Why corrupt or truncated bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    TooShort {
        len: usize,
    },
    Magic,
    Version {
        found: u32,
    },
    Grid {
        grid: u32,
    },
    Count {
        count: u64,
    },
    Size {
        len: usize,
        expected: u128,
    },
    /// `None` for the total weight, else the element index.
    Value {
        index: Option<usize>,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::TooShort { len } => {
                write!(
                    f,
                    "{len} bytes is shorter than the {HEADER_LEN}-byte header"
                )
            }
            FormatError::Magic => write!(f, "bad magic: not an emberfl exact sum"),
            FormatError::Version { found } => {
                write!(
                    f,
                    "unsupported version {found} (this build reads {VERSION})"
                )
            }
            FormatError::Grid { grid } => write!(f, "grid {grid} is above {MAX_GRID}"),
            FormatError::Count { count } => {
                write!(f, "count {count} is above the limit of {MAX_ADDS} vectors")
            }
            FormatError::Size { len, expected } => write!(
                f,
                "{len} bytes, but the header's length needs {expected} (truncated or padded)"
            ),
            FormatError::Value { index: None } => {
                write!(f, "the total weight exceeds what its count allows")
            }
            FormatError::Value { index: Some(i) } => {
                write!(f, "element {i} exceeds what the count allows")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExactError {
    BadGrid {
        grid: u32,
    },
    LengthMismatch {
        len: usize,
        expected: usize,
    },
    GridMismatch {
        grid: u32,
        expected: u32,
    },
    /// Not finite, `|w| >= 2^39`, or not a multiple of `2^-64`.
    BadWeight {
        value: f64,
    },
    /// `x[index]` is NaN or Inf.
    NonFinite {
        index: usize,
        value: f64,
    },
    /// `|weight * x[index]|` is not below `limit`.
    TermOutOfRange {
        index: usize,
        value: f64,
        weight: f64,
        limit: f64,
    },
    TooManyAdds {
        count: u64,
    },
    ZeroWeight,
    /// The mean at `index` is beyond the f32 range.
    MeanOutOfRange {
        index: usize,
    },
    Format(FormatError),
}

impl fmt::Display for ExactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExactError::BadGrid { grid } => {
                write!(f, "grid {grid} is out of range: it must be 0..={MAX_GRID}")
            }
            ExactError::LengthMismatch { len, expected } => write!(
                f,
                "the vector has {len} elements but the sum has {expected}"
            ),
            ExactError::GridMismatch { grid, expected } => write!(
                f,
                "cannot merge a sum on grid 2^-{grid} into one on grid 2^-{expected}"
            ),
            ExactError::BadWeight { value } => write!(
                f,
                "weight {value} is not exact: weights must be finite, of magnitude below \
                 2^39 and multiples of 2^-64"
            ),
            ExactError::NonFinite { index, value } => {
                write!(f, "the vector holds {value} at index {index}")
            }
            ExactError::TermOutOfRange {
                index,
                value,
                weight,
                limit,
            } => write!(
                f,
                "weight * x[{index}] = {weight} * {value} is out of range: terms must be \
                 below {limit:e} in magnitude on this grid"
            ),
            ExactError::TooManyAdds { count } => write!(
                f,
                "{count} vectors exceed the limit of {MAX_ADDS} in one exact sum"
            ),
            ExactError::ZeroWeight => {
                write!(f, "the total weight is zero: the mean is undefined")
            }
            ExactError::MeanOutOfRange { index } => {
                write!(f, "the mean at index {index} is beyond the float32 range")
            }
            ExactError::Format(e) => write!(f, "corrupt exact sum bytes: {e}"),
        }
    }
}

impl std::error::Error for ExactError {}

impl From<FormatError> for ExactError {
    fn from(e: FormatError) -> Self {
        ExactError::Format(e)
    }
}

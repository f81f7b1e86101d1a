//! The element types a store file may hold, with their safetensors names.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    F64,
    I64,
    F32,
    I32,
    F16,
    BF16,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// Every dtype, in the order tensors are laid out in files we write: widest first,
    /// so each tensor starts at a multiple of its own item size and can be viewed in
    /// place without copying.
    pub const WRITE_ORDER: [Dtype; 10] = [
        Dtype::F64,
        Dtype::I64,
        Dtype::F32,
        Dtype::I32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I16,
        Dtype::I8,
        Dtype::U8,
        Dtype::Bool,
    ];

    pub fn itemsize(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::F32 => "F32",
            Dtype::I32 => "I32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn parse(name: &str) -> Option<Dtype> {
        Dtype::WRITE_ORDER.into_iter().find(|d| d.name() == name)
    }

    /// Position in [`Dtype::WRITE_ORDER`].
    pub fn rank(self) -> usize {
        Dtype::WRITE_ORDER
            .iter()
            .position(|d| *d == self)
            .expect("every dtype is in WRITE_ORDER")
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::WRITE_ORDER {
            assert_eq!(Dtype::parse(d.name()), Some(d));
        }
        assert_eq!(Dtype::parse("F8_E4M3"), None);
        assert_eq!(Dtype::parse("f32"), None);
    }

    #[test]
    fn write_order_is_widest_first() {
        let sizes: Vec<usize> = Dtype::WRITE_ORDER.iter().map(|d| d.itemsize()).collect();
        let mut sorted = sizes.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(sizes, sorted);
    }
}

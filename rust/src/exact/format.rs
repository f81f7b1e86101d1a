//! The byte format of an exact sum (see the module doc of [`crate::exact`]).

use super::{
    ExactError, ExactSum, FormatError, HEADER_LEN, MAGIC, MAX_ADDS, MAX_GRID, TERM_BITS, VERSION,
};

impl ExactSum {
    /// Bytes in [`to_bytes`](Self::to_bytes)' format.
    pub fn byte_len(&self) -> usize {
        HEADER_LEN + 16 * self.len()
    }

    /// Writes the byte format (see the module doc) into `buf` of [`byte_len`](Self::byte_len).
    pub fn write_bytes(&self, buf: &mut [u8]) {
        assert_eq!(buf.len(), self.byte_len(), "buffer size");
        let (head, body) = buf.split_at_mut(HEADER_LEN);
        head[0..8].copy_from_slice(&MAGIC);
        head[8..12].copy_from_slice(&VERSION.to_le_bytes());
        head[12..16].copy_from_slice(&self.grid.to_le_bytes());
        head[16..24].copy_from_slice(&(self.len() as u64).to_le_bytes());
        head[24..32].copy_from_slice(&self.count.to_le_bytes());
        head[32..48].copy_from_slice(&self.weight.to_le_bytes());
        for (dst, v) in body.chunks_exact_mut(16).zip(&self.acc) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.byte_len()];
        self.write_bytes(&mut buf);
        buf
    }

    /// Reads [`to_bytes`](Self::to_bytes)' format, checking every field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ExactError> {
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::TooShort { len: bytes.len() }.into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let i128_at =
            |i: usize| i128::from_le_bytes(bytes[i..i + 16].try_into().expect("16 bytes"));
        if bytes[0..8] != MAGIC {
            return Err(FormatError::Magic.into());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(FormatError::Version { found: version }.into());
        }
        let grid = u32_at(12);
        if grid > MAX_GRID {
            return Err(FormatError::Grid { grid }.into());
        }
        let len = u64_at(16);
        let count = u64_at(24);
        if count > MAX_ADDS {
            return Err(FormatError::Count { count }.into());
        }
        let expected = HEADER_LEN as u128 + 16 * len as u128;
        if bytes.len() as u128 != expected {
            return Err(FormatError::Size {
                len: bytes.len(),
                expected,
            }
            .into());
        }
        // What `count` terms of magnitude < 2^103 can reach; more means corruption.
        let bound = count as u128 * ((1u128 << TERM_BITS) - 1);
        let weight = i128_at(32);
        if weight.unsigned_abs() > bound {
            return Err(FormatError::Value { index: None }.into());
        }
        let mut acc = Vec::with_capacity(len as usize);
        for (index, chunk) in bytes[HEADER_LEN..].chunks_exact(16).enumerate() {
            let v = i128::from_le_bytes(chunk.try_into().expect("16 bytes"));
            if v.unsigned_abs() > bound {
                return Err(FormatError::Value { index: Some(index) }.into());
            }
            acc.push(v);
        }
        Ok(ExactSum {
            grid,
            count,
            weight,
            acc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::test_util::wild;
    use crate::kernels::Input;

    #[test]
    fn bytes_round_trip_and_corruption() {
        let x = wild(9, 1000, 10);
        let mut s = ExactSum::new(x.len(), 72).unwrap();
        s.add(Input::F32(&x), 5.0, 1).unwrap();
        s.add(Input::F32(&x), -0.25, 1).unwrap();
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), HEADER_LEN + 16 * 1000);
        assert_eq!(&bytes[..8], b"EMBFLXS\0");
        assert_eq!(ExactSum::from_bytes(&bytes).unwrap(), s);
        let err = |b: &[u8]| match ExactSum::from_bytes(b) {
            Err(ExactError::Format(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(err(&bytes[..10]), FormatError::TooShort { len: 10 });
        assert!(matches!(
            err(&bytes[..bytes.len() - 1]),
            FormatError::Size { .. }
        ));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert_eq!(err(&b), FormatError::Magic);
        let mut b = bytes.clone();
        b[8] = 2;
        assert_eq!(err(&b), FormatError::Version { found: 2 });
        let mut b = bytes.clone();
        b[12] = 200;
        assert_eq!(err(&b), FormatError::Grid { grid: 200 });
        let mut b = bytes.clone();
        b[16] = 0xff;
        assert!(matches!(err(&b), FormatError::Size { .. }));
        let mut b = bytes.clone();
        b[31] = 1;
        assert!(matches!(err(&b), FormatError::Count { .. }));
        let mut b = bytes.clone();
        b[47] = 0x40;
        assert_eq!(err(&b), FormatError::Value { index: None });
        let mut b = bytes.clone();
        b[HEADER_LEN + 16 * 7 + 15] ^= 0x40;
        assert_eq!(err(&b), FormatError::Value { index: Some(7) });
        // An empty sum round trips too.
        let empty = ExactSum::new(0, 0).unwrap();
        assert_eq!(ExactSum::from_bytes(&empty.to_bytes()).unwrap(), empty);
    }
}

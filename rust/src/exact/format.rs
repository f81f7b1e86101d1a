//! The byte format of an exact sum (see the module doc of [`crate::exact`]).

use super::{
    par_chunks, ExactError, ExactSum, FormatError, HEADER_LEN, MAGIC, MAX_ADDS, MAX_GRID,
    TERM_BITS, VERSION,
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
        let head = Header::parse(bytes)?;
        let mut acc = Vec::with_capacity(head.len);
        for (index, chunk) in bytes[HEADER_LEN..].chunks_exact(16).enumerate() {
            acc.push(head.value(chunk, index)?);
        }
        Ok(ExactSum {
            grid: head.grid,
            count: head.count,
            weight: head.weight,
            acc,
        })
    }

    /// Adds the sum that `bytes` hold (in [`to_bytes`](Self::to_bytes)' format) into this
    /// one, reading them in place: merging a saved sum costs no second copy of it. Every
    /// field is checked as by [`from_bytes`](Self::from_bytes); on an error this sum is
    /// left as it was.
    pub fn merge_bytes(&mut self, bytes: &[u8], threads: usize) -> Result<(), ExactError> {
        let head = Header::parse(bytes)?;
        if head.len != self.len() {
            return Err(ExactError::LengthMismatch {
                len: head.len,
                expected: self.len(),
            });
        }
        if head.grid != self.grid {
            return Err(ExactError::GridMismatch {
                grid: head.grid,
                expected: self.grid,
            });
        }
        self.check_count(head.count)?;
        let body = &bytes[HEADER_LEN..];
        let head = &head;
        // Each chunk adds its values block by block, each block checked before it is
        // added; a chunk that meets a bad value stops there and says how far it got.
        let reached: Vec<Result<(), ExactError>> =
            par_chunks(&mut self.acc, threads, |chunk, offset| {
                let src = &body[16 * offset..16 * (offset + chunk.len())];
                for (b, (dst, raw)) in chunk
                    .chunks_mut(MERGE_BLOCK)
                    .zip(src.chunks(16 * MERGE_BLOCK))
                    .enumerate()
                {
                    let start = offset + b * MERGE_BLOCK;
                    let mut values = [0i128; MERGE_BLOCK];
                    for (i, cell) in raw.chunks_exact(16).enumerate() {
                        values[i] = head.value(cell, start + i)?;
                    }
                    for (a, v) in dst.iter_mut().zip(values) {
                        // Both respect |v| <= count * (2^103 - 1), and the counts' sum is checked.
                        *a = a.wrapping_add(v);
                    }
                }
                Ok(())
            });
        if let Some(err) = reached.iter().find_map(|r| r.as_ref().err().cloned()) {
            // Undo what the chunks added: the blocks before each one's first bad block.
            par_chunks(&mut self.acc, threads, |chunk, offset| {
                let src = &body[16 * offset..16 * (offset + chunk.len())];
                for (dst, raw) in chunk
                    .chunks_mut(MERGE_BLOCK)
                    .zip(src.chunks(16 * MERGE_BLOCK))
                {
                    let values: Vec<i128> = raw
                        .chunks_exact(16)
                        .map(|c| i128::from_le_bytes(c.try_into().expect("16 bytes")))
                        .collect();
                    if values.iter().any(|v| v.unsigned_abs() > head.bound) {
                        break;
                    }
                    for (a, v) in dst.iter_mut().zip(values) {
                        *a = a.wrapping_sub(v);
                    }
                }
            });
            return Err(err);
        }
        self.count += head.count;
        self.weight += head.weight;
        Ok(())
    }
}

/// Values checked and added per block by [`ExactSum::merge_bytes`].
const MERGE_BLOCK: usize = 256;

/// The checked header of a sum's bytes.
struct Header {
    grid: u32,
    len: usize,
    count: u64,
    weight: i128,
    /// What `count` terms of magnitude < 2^103 can reach; more means corruption.
    bound: u128,
}

impl Header {
    fn parse(bytes: &[u8]) -> Result<Self, ExactError> {
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::TooShort { len: bytes.len() }.into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
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
        let bound = count as u128 * ((1u128 << TERM_BITS) - 1);
        let weight = i128::from_le_bytes(bytes[32..48].try_into().expect("16 bytes"));
        if weight.unsigned_abs() > bound {
            return Err(FormatError::Value { index: None }.into());
        }
        Ok(Header {
            grid,
            len: len as usize,
            count,
            weight,
            bound,
        })
    }

    /// The value in `cell` (16 bytes), element `index`, checked against the bound.
    fn value(&self, cell: &[u8], index: usize) -> Result<i128, ExactError> {
        let v = i128::from_le_bytes(cell.try_into().expect("16 bytes"));
        if v.unsigned_abs() > self.bound {
            return Err(FormatError::Value { index: Some(index) }.into());
        }
        Ok(v)
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

    #[test]
    fn merge_bytes_is_merge_and_leaves_the_sum_unchanged_on_errors() {
        let x = wild(11, 5000, 10);
        let y = wild(12, 5000, 10);
        let mut a = ExactSum::new(x.len(), 64).unwrap();
        a.add(Input::F32(&x), 3.0, 1).unwrap();
        let mut b = ExactSum::new(y.len(), 64).unwrap();
        b.add(Input::F32(&y), 0.5, 1).unwrap();
        b.add(Input::F32(&x), -2.0, 1).unwrap();
        let bytes = b.to_bytes();
        for threads in [1, 3] {
            let mut via_bytes = a.clone();
            via_bytes.merge_bytes(&bytes, threads).unwrap();
            let mut via_merge = a.clone();
            via_merge.merge(&b, 1).unwrap();
            assert_eq!(via_bytes, via_merge);
            // A value out of bounds anywhere (here late, in the last chunk) is refused,
            // and what the other chunks had added is taken back out.
            let mut bad = bytes.clone();
            bad[HEADER_LEN + 16 * 4321 + 15] ^= 0x40;
            let mut untouched = a.clone();
            assert_eq!(
                untouched.merge_bytes(&bad, threads),
                Err(FormatError::Value { index: Some(4321) }.into())
            );
            assert_eq!(untouched, a);
        }
        let mut other_len = ExactSum::new(10, 64).unwrap();
        assert!(matches!(
            other_len.merge_bytes(&bytes, 1),
            Err(ExactError::LengthMismatch { .. })
        ));
        let mut other_grid = ExactSum::new(y.len(), 40).unwrap();
        assert!(matches!(
            other_grid.merge_bytes(&bytes, 1),
            Err(ExactError::GridMismatch { .. })
        ));
        let mut a2 = a.clone();
        assert!(matches!(
            a2.merge_bytes(&bytes[..100], 1),
            Err(ExactError::Format(FormatError::Size { .. }))
        ));
        assert_eq!(a2, a);
    }
}

//! GGML tensor types and dequantization to f32, bit-exact with llama.cpp's `dequantize_row_*`
//! (plain multiply/subtract in the same order, no fused multiply-add).

use anyhow::{bail, ensure, Result};
use half::{bf16, f16};

/// A GGML tensor type, with its real GGML type id as discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    Iq2Xxs = 16,
    Iq2Xs = 17,
    Iq3Xxs = 18,
    Iq1S = 19,
    Iq4Nl = 20,
    Iq3S = 21,
    Iq2S = 22,
    Iq4Xs = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    Iq1M = 29,
    BF16 = 30,
    Tq1_0 = 34,
    Tq2_0 = 35,
    Mxfp4 = 39,
}

const QK_K: usize = 256;

impl GgmlType {
    /// All known types.
    pub const ALL: [GgmlType; 32] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::Iq2Xxs,
        GgmlType::Iq2Xs,
        GgmlType::Iq3Xxs,
        GgmlType::Iq1S,
        GgmlType::Iq4Nl,
        GgmlType::Iq3S,
        GgmlType::Iq2S,
        GgmlType::Iq4Xs,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::Iq1M,
        GgmlType::BF16,
        GgmlType::Tq1_0,
        GgmlType::Tq2_0,
        GgmlType::Mxfp4,
    ];

    /// The type with GGML id `id`, or an error for an unknown id.
    pub fn from_id(id: u32) -> Result<GgmlType> {
        match GgmlType::ALL.iter().find(|t| **t as u32 == id) {
            Some(t) => Ok(*t),
            None => bail!("unknown GGML tensor type id {id}"),
        }
    }

    /// The type named `name` (llama.cpp spelling, e.g. `Q4_K`), if known.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL.iter().copied().find(|t| t.name() == name)
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    /// llama.cpp's name for the type (`Q4_K`, `F16`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            Iq2Xxs => "IQ2_XXS",
            Iq2Xs => "IQ2_XS",
            Iq3Xxs => "IQ3_XXS",
            Iq1S => "IQ1_S",
            Iq4Nl => "IQ4_NL",
            Iq3S => "IQ3_S",
            Iq2S => "IQ2_S",
            Iq4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Iq1M => "IQ1_M",
            BF16 => "BF16",
            Tq1_0 => "TQ1_0",
            Tq2_0 => "TQ2_0",
            Mxfp4 => "MXFP4",
        }
    }

    /// (elements per block, bytes per block), as in ggml's type traits.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 | Iq4Nl => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Mxfp4 => (32, 17),
            Q2K => (QK_K, 84),
            Q3K => (QK_K, 110),
            Q4K => (QK_K, 144),
            Q5K => (QK_K, 176),
            Q6K => (QK_K, 210),
            Q8K => (QK_K, 292),
            Iq2Xxs => (QK_K, 66),
            Iq2Xs => (QK_K, 74),
            Iq3Xxs => (QK_K, 98),
            Iq1S => (QK_K, 50),
            Iq3S => (QK_K, 110),
            Iq2S => (QK_K, 82),
            Iq4Xs => (QK_K, 136),
            Iq1M => (QK_K, 56),
            Tq1_0 => (QK_K, 54),
            Tq2_0 => (QK_K, 66),
        }
    }

    pub fn block_size(self) -> usize {
        self.block_layout().0
    }

    pub fn type_size(self) -> usize {
        self.block_layout().1
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K | Q8K
        )
    }

    /// Bytes needed for `n_elements` values; errors when `n_elements` is not a whole number
    /// of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Result<u64> {
        let (bs, ts) = self.block_layout();
        ensure!(
            n_elements.is_multiple_of(bs as u64),
            "{} elements is not a multiple of the {} block size {bs}",
            n_elements,
            self.name()
        );
        (n_elements / bs as u64)
            .checked_mul(ts as u64)
            .ok_or_else(|| anyhow::anyhow!("tensor byte size overflows"))
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantize `src` (whole blocks of type `ty`) into `dst` (f32).
/// `dst.len()` must be the number of elements `src` holds.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let (bs, ts) = ty.block_layout();
    ensure!(
        dst.len().is_multiple_of(bs),
        "{} output length {} is not a multiple of the block size {bs}",
        ty,
        dst.len()
    );
    let nb = dst.len() / bs;
    ensure!(
        src.len() == nb * ts,
        "{} data is {} bytes, expected {} for {} values",
        ty,
        src.len(),
        nb * ts,
        dst.len()
    );
    let blocks = src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks {
                y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
        GgmlType::Q8K => blocks.for_each(|(b, y)| q8_k(b, y)),
        other => bail!("dequantization of {other} tensors is not supported"),
    }
    Ok(())
}

/// Dequantize to f32, then round each value to f16 (round to nearest even).
pub fn dequantize_to_f16(ty: GgmlType, src: &[u8], dst: &mut [f16]) -> Result<()> {
    use half::slice::HalfFloatSliceExt;
    if ty == GgmlType::F16 {
        ensure!(
            src.len() == dst.len() * 2,
            "F16 data is {} bytes, expected {}",
            src.len(),
            dst.len() * 2
        );
        for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
            *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
        }
        return Ok(());
    }
    // Work through a bounded f32 scratch buffer so the f32 copy never exists whole.
    let (bs, ts) = ty.block_layout();
    ensure!(
        dst.len().is_multiple_of(bs),
        "{} output length {} is not a multiple of the block size {bs}",
        ty,
        dst.len()
    );
    let blocks_per_chunk = (4096 / bs).max(1);
    let mut scratch = vec![0f32; blocks_per_chunk * bs];
    ensure!(
        src.len() == dst.len() / bs * ts,
        "{} data is {} bytes, expected {} for {} values",
        ty,
        src.len(),
        dst.len() / bs * ts,
        dst.len()
    );
    for (s, d) in src
        .chunks(blocks_per_chunk * ts)
        .zip(dst.chunks_mut(blocks_per_chunk * bs))
    {
        let tmp = &mut scratch[..d.len()];
        dequantize(ty, s, tmp)?;
        d.convert_from_f32_slice(tmp);
    }
    Ok(())
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32;
        let x1 = (qs[j] >> 4) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh_0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh_1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh_0) as i32;
        let x1 = ((qs[j] >> 4) | xh_1) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, v) in y.iter_mut().enumerate() {
        *v = b[2 + j] as i8 as f32 * d;
    }
}

/// llama.cpp's `get_scale_min_k4`: 6-bit scale and min number `j` (0..8) of a K block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (n, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc, m) = scale_min_k4(2 * n, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * n + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (n, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let u1 = 1u8 << (2 * n);
        let u2 = 2u8 << (2 * n);
        let (sc, m) = scale_min_k4(2 * n, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * n + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half_idx in 0..2 {
        let ql = &ql_all[64 * half_idx..];
        let qh = &qh_all[32 * half_idx..];
        let sc = &sc_all[8 * half_idx..];
        let y = &mut y[128 * half_idx..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (j, v) in y.iter_mut().enumerate() {
        *v = d * b[4 + j] as i8 as f32;
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn type_ids_round_trip_and_unknown_ids_fail() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()).unwrap(), t);
        }
        assert_eq!(GgmlType::from_id(12).unwrap(), GgmlType::Q4K);
        assert_eq!(GgmlType::from_id(14).unwrap(), GgmlType::Q6K);
        for bad in [4, 5, 31, 32, 33, 36, 1000, u32::MAX] {
            assert!(GgmlType::from_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn q8_0_hand_block() {
        let mut b = Vec::from(h(0.5));
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_hand_block() {
        // low nibble j -> element j, high nibble -> element j+16, both offset by 8.
        let mut b = Vec::from(h(2.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut y).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 2.0);
        }
    }

    #[test]
    fn q5_0_hand_block_uses_high_bits() {
        // qh bit j is the 5th bit of element j; bit j+16 the 5th bit of element j+16.
        let mut b = Vec::from(h(1.0));
        let qh: u32 = 0b1010_0000_0000_0000_0000_0000_0000_0101; // elements 0, 2, 29, 31
        b.extend(qh.to_le_bytes());
        b.extend([0x31u8; 16]); // low nibble 1, high nibble 3
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q5_0, &b, &mut y).unwrap();
        for j in 0..32 {
            let low = if j < 16 { 1 } else { 3 };
            let hi = if qh >> j & 1 == 1 { 16 } else { 0 };
            assert_eq!(y[j], (low + hi - 16) as f32, "element {j}");
        }
    }

    #[test]
    fn q6_k_hand_block() {
        let mut b = vec![0u8; 210];
        // element 0: ql low nibble 5, qh bits 0..2 = 2 -> q = 5 | 32 = 37 - 32 = 5, scale[0]
        b[0] = 0x05;
        b[128] = 0b10;
        b[192] = (-3i8) as u8; // scale 0
        b[192 + 4] = 7; // scale used by elements 64..80 (q3 of first half)
        b[208..210].copy_from_slice(&h(0.25));
        let mut y = [0f32; 256];
        dequantize(GgmlType::Q6K, &b, &mut y).unwrap();
        assert_eq!(y[0], 0.25 * -3.0 * 5.0);
        // element 1: all zero bits -> q = -32 with scale[0]
        assert_eq!(y[1], 0.25 * -3.0 * -32.0);
        // element 64 uses high nibble of ql[0] (0) and qh bits 4..6 (0): q=-32, scale[4]=7
        assert_eq!(y[64], 0.25 * 7.0 * -32.0);
        // element 16 uses scale[1] = 0
        assert_eq!(y[16], 0.0);
    }

    #[test]
    fn q4_k_hand_block() {
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&h(0.5));
        b[2..4].copy_from_slice(&h(0.25));
        // sub-block 0: scale 3, min 2; sub-block 5 (j>=4): scale from scales[9]&15 | (scales[1]>>6)<<4
        b[4] = 3;
        b[8] = 2;
        b[4 + 9] = 0x21; // sc5 low = 1, m5 low = 2
        b[4 + 1] = 0xC0; // sc5 high bits = 3 -> sc5 = 1 | 3<<4 = 49 ; also sc1 = 0
        b[4 + 5] = 0x40; // m5 high bits = 1 -> m5 = 2 | 1<<4 = 18 ; m1 = 0
        b[16] = 0x07; // element 0: 7 ; element 32: 0
        b[16 + 64] = 0x90; // chunk 2 (elements 128..192): low nibble 0 -> el 128, high 9 -> el 160
        let mut y = [0f32; 256];
        dequantize(GgmlType::Q4K, &b, &mut y).unwrap();
        assert_eq!(y[0], 0.5 * 3.0 * 7.0 - 0.25 * 2.0);
        assert_eq!(y[32], 0.0); // sc1 = 0, m1 = 0
        assert_eq!(y[160], 0.5 * 49.0 * 9.0 - 0.25 * 18.0);
    }

    #[test]
    fn q8_k_and_bf16_and_f16() {
        let mut b = Vec::from(1.5f32.to_le_bytes());
        b.extend((0..256).map(|i| (i as u8).wrapping_mul(7)));
        b.extend([0u8; 32]);
        let mut y = vec![0f32; 256];
        dequantize(GgmlType::Q8K, &b, &mut y).unwrap();
        for i in 0..256 {
            assert_eq!(y[i], 1.5 * ((i as u8).wrapping_mul(7) as i8) as f32);
        }
        let bf: Vec<u8> = [1.0f32, -2.5, 3.0e-3]
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        let mut y = [0f32; 3];
        dequantize(GgmlType::BF16, &bf, &mut y).unwrap();
        assert_eq!(y[0], 1.0);
        assert_eq!(y[1], -2.5);
        assert_eq!(y[2], bf16::from_f32(3.0e-3).to_f32());
        let mut z = [f16::ZERO; 3];
        dequantize_to_f16(GgmlType::BF16, &bf, &mut z).unwrap();
        assert_eq!(z[1], f16::from_f32(-2.5));
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut y = [0f32; 32];
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], &mut y).is_err());
        let mut y = [0f32; 31];
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], &mut y).is_err());
        let mut y = [0f32; 256];
        assert!(dequantize(GgmlType::Iq2Xxs, &[0u8; 66], &mut y).is_err());
    }
}

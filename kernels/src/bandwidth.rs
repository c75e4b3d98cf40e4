//! Device-to-device copy bandwidth: the memory ceiling that benches compare against.
//!
//! [`copy_u32`] is a vectorised copy kernel (the widest vector the device loads in one
//! instruction: 16 bytes on CUDA); [`measure_copy_bandwidth`] times it over buffers much
//! larger than the L2 cache (50 MB on an H100) after a warm-up, synchronising the device
//! before reading the clock, and counts bytes read + bytes written.

use std::time::Instant;

use anyhow::{ensure, Result};
use cubecl::prelude::*;

use crate::DeviceTensor;

/// Default size of each of the two buffers: 256 MiB (10× an H100's L2 together).
pub const DEFAULT_COPY_BYTES: usize = 256 << 20;

#[cube(launch)]
fn copy_kernel<N: Size>(
    src: &Array<Vector<u32, N>>,
    dst: &mut Array<Vector<u32, N>>,
    total: usize,
) {
    let idx = ABSOLUTE_POS;
    if idx < total {
        dst[idx] = src[idx];
    }
}

/// The vector width (in u32s) used to copy `len` u32s: the widest the device loads at once
/// that divides `len`.
pub fn copy_vector_size<R: Runtime>(client: &ComputeClient<R>, len: usize) -> usize {
    client
        .io_optimized_vector_sizes(size_of::<u32>())
        .find(|&v| len.is_multiple_of(v))
        .unwrap_or(1)
}

/// `dst = src`, bit for bit, with vectorised loads and stores.
pub fn copy_u32<R: Runtime>(
    client: &ComputeClient<R>,
    src: &DeviceTensor<R, u32>,
    dst: &DeviceTensor<R, u32>,
) -> Result<()> {
    let len = src.len();
    ensure!(
        dst.len() == len,
        "copy: src has {len} elements, dst {}",
        dst.len()
    );
    let vs = copy_vector_size(client, len);
    let n = len / vs;
    // SAFETY: each handle holds `len` u32s, i.e. exactly `n` vectors of `vs`.
    let (s, d) = unsafe {
        (
            ArrayArg::from_raw_parts(src.handle.clone(), n),
            ArrayArg::from_raw_parts(dst.handle.clone(), n),
        )
    };
    let (count, dim) = crate::grid::elementwise(client, n);
    copy_kernel::launch::<R>(client, count, dim, vs, s, d, n);
    Ok(())
}

/// A copy-bandwidth measurement: each sample times `launches` copies of `buffer_bytes`.
#[derive(Debug, Clone)]
pub struct CopyBandwidth {
    pub buffer_bytes: usize,
    pub launches: usize,
    /// Vector width of the copy, in u32s.
    pub vector_size: usize,
    /// GB/s (1e9 bytes) of each sample, counting bytes read + bytes written.
    pub samples_gbps: Vec<f64>,
}

impl CopyBandwidth {
    /// The best sample: the ceiling a kernel's bandwidth is compared with.
    pub fn best_gbps(&self) -> f64 {
        self.samples_gbps.iter().copied().fold(0.0, f64::max)
    }
}

/// Measures device-to-device copy bandwidth with two buffers of about `buffer_bytes` each
/// (capped by the device's largest buffer), filled with random non-zero words: one warm-up
/// copy, then `samples` samples of `launches` back-to-back copies, each sample timed from
/// launch to device synchronisation.
pub fn measure_copy_bandwidth<R: Runtime>(
    client: &ComputeClient<R>,
    buffer_bytes: usize,
    samples: usize,
    launches: usize,
) -> Result<CopyBandwidth> {
    ensure!(
        samples > 0 && launches > 0,
        "copy bandwidth: samples and launches must be at least 1"
    );
    let max = client.properties().memory.max_page_size as usize;
    let bytes = buffer_bytes.min(max) / 64 * 64;
    ensure!(
        bytes >= 64,
        "copy bandwidth: a buffer of {buffer_bytes} bytes is too small (at least 64)"
    );
    let len = bytes / size_of::<u32>();
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ len as u64;
    let data: Vec<u32> = (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 32) as u32) | 1
        })
        .collect();
    let src = DeviceTensor::<R, u32>::from_slice(client, &data, &[len])?;
    drop(data);
    let dst = DeviceTensor::<R, u32>::empty(client, &[len])?;
    copy_u32(client, &src, &dst)?;
    sync(client)?;
    let mut samples_gbps = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = Instant::now();
        for _ in 0..launches {
            copy_u32(client, &src, &dst)?;
        }
        sync(client)?;
        let secs = t0.elapsed().as_secs_f64();
        samples_gbps.push((2 * bytes * launches) as f64 / secs / 1e9);
    }
    Ok(CopyBandwidth {
        buffer_bytes: bytes,
        launches,
        vector_size: copy_vector_size(client, len),
        samples_gbps,
    })
}

/// Waits until every queued kernel has finished; launch errors become errors.
pub fn sync<R: Runtime>(client: &ComputeClient<R>) -> Result<()> {
    crate::buffer::check_launches(client)?;
    cubecl::future::block_on(client.sync())
        .map_err(|e| anyhow::anyhow!("device synchronisation failed: {e:?}"))
}

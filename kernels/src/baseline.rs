//! Outside baselines for parity tests and benches: cuBLAS (CUDA only, through cudarc, on the
//! same device buffers cubecl allocated) and cubek's matmul (tracel's cubecl kernels, any
//! runtime).

use anyhow::Result;
use cubecl::prelude::*;
use half::f16;

use crate::matmul::{matmul, MatmulVariant};
use crate::DeviceTensor;

/// `y = x · Wᵀ` with cubek's matmul (its `Auto` strategy): the `Cubek` matmul variant
/// without bias. x [m, k], W [n, k], y [m, n] f16.
pub fn cubek_matmul<R: Runtime>(
    client: &ComputeClient<R>,
    x: &DeviceTensor<R, f16>,
    w: &DeviceTensor<R, f16>,
    y: &DeviceTensor<R, f16>,
) -> Result<()> {
    matmul(client, MatmulVariant::Cubek, x, w, None, y)
}

#[cfg(feature = "cuda")]
pub use cublas::Cublas;

#[cfg(feature = "cuda")]
mod cublas {
    use std::sync::Arc;

    use anyhow::{ensure, Context, Result};
    use cubecl::cuda::CudaRuntime;
    use cubecl::prelude::*;
    use cudarc::cublas::{result::gemm_ex, sys, CudaBlas};
    use cudarc::driver::{CudaContext, CudaStream};
    use half::f16;

    use crate::matmul::RowChunked;
    use crate::DeviceTensor;

    type R = CudaRuntime;

    /// cuBLAS on cubecl's buffers (cubecl and cudarc share the primary context).
    pub struct Cublas {
        stream: Arc<CudaStream>,
        blas: CudaBlas,
    }

    /// The raw device address of a cubecl buffer and the guard that keeps it alive.
    fn device_ptr<E: CubeElement>(
        client: &ComputeClient<R>,
        t: &DeviceTensor<R, E>,
    ) -> Result<(u64, impl Sized)> {
        let res = client
            .get_resource(t.handle.clone())
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("getting a cubecl buffer's device pointer")?;
        let r = res.resource();
        ensure!(
            r.size as usize >= t.len() * size_of::<E>(),
            "cubecl buffer holds {} bytes, expected at least {}",
            r.size,
            t.len() * size_of::<E>()
        );
        Ok((r.ptr, res))
    }

    impl Cublas {
        pub fn new() -> Result<Self> {
            let ctx = CudaContext::new(0)?;
            let stream = ctx.default_stream();
            let blas = CudaBlas::new(stream.clone())?;
            Ok(Self { stream, blas })
        }

        /// Row-major `y[m][n] = x[m][k] · W[n][k]ᵀ` (GemmEx, f16 in and out, f32 compute), one
        /// call per weight chunk. Column-major that is `yᵀ (n×m) = W (opT of k×n) · xᵀ (k×m)`;
        /// a chunk of weight rows `n0..n0+c` writes the columns from `n0` of y's rows (ldc = n).
        /// Waits for cubecl's queued work first and for cuBLAS before returning.
        pub fn matmul(
            &self,
            client: &ComputeClient<R>,
            x: &DeviceTensor<R, f16>,
            w: &RowChunked<R, f16>,
            y: &DeviceTensor<R, f16>,
        ) -> Result<()> {
            // cubecl's uploads and launches run on its own stream: wait for them.
            cubecl::future::block_on(client.sync()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            self.enqueue(client, x, w, y)?;
            self.stream.synchronize()?;
            Ok(())
        }

        /// [`Cublas::matmul`] without the waits: cubecl's writes to x must be complete, and
        /// `synchronize` waits for the result (for timing loops).
        pub fn enqueue(
            &self,
            client: &ComputeClient<R>,
            x: &DeviceTensor<R, f16>,
            w: &RowChunked<R, f16>,
            y: &DeviceTensor<R, f16>,
        ) -> Result<()> {
            let (m, k, n) = (x.shape[0], x.shape[1], w.n);
            ensure!(
                w.k == k && y.shape == [m, n],
                "cuBLAS matmul: x {:?}, W [{n}, {}], y {:?} do not fit",
                x.shape,
                w.k,
                y.shape
            );
            let (xp, _xg) = device_ptr(client, x)?;
            let (yp, _yg) = device_ptr(client, y)?;
            let (alpha, beta) = (1.0f32, 0.0f32);
            let mut n0 = 0;
            for chunk in &w.chunks {
                let (wp, _wg) = device_ptr(client, chunk)?;
                let rows = chunk.shape[0];
                // SAFETY: pointers to live buffers of the checked sizes; cuBLAS runs on our
                // stream after cubecl's work (synced above).
                unsafe {
                    gemm_ex(
                        *self.blas.handle(),
                        sys::cublasOperation_t::CUBLAS_OP_T,
                        sys::cublasOperation_t::CUBLAS_OP_N,
                        rows as i32,
                        m as i32,
                        k as i32,
                        (&alpha) as *const f32 as *const _,
                        wp as *const _,
                        sys::cudaDataType_t::CUDA_R_16F,
                        k as i32,
                        xp as *const _,
                        sys::cudaDataType_t::CUDA_R_16F,
                        k as i32,
                        (&beta) as *const f32 as *const _,
                        (yp + (n0 * size_of::<f16>()) as u64) as *mut _,
                        sys::cudaDataType_t::CUDA_R_16F,
                        n as i32,
                        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )?;
                }
                n0 += rows;
            }
            ensure!(n0 == n, "weight chunks hold {n0} rows, expected {n}");
            Ok(())
        }

        pub fn synchronize(&self) -> Result<()> {
            Ok(self.stream.synchronize()?)
        }
    }
}

//! A typed, shaped device buffer.

use std::marker::PhantomData;

use anyhow::{ensure, Context, Result};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// A row-major device tensor of `E` elements.
pub struct DeviceTensor<R: Runtime, E: CubeElement> {
    pub handle: Handle,
    pub shape: Vec<usize>,
    _r: PhantomData<R>,
    _e: PhantomData<E>,
}

impl<R: Runtime, E: CubeElement> Clone for DeviceTensor<R, E> {
    fn clone(&self) -> Self {
        Self {
            handle: self.handle.clone(),
            shape: self.shape.clone(),
            _r: PhantomData,
            _e: PhantomData,
        }
    }
}

impl<R: Runtime, E: CubeElement> DeviceTensor<R, E> {
    /// Uploads `data` with the given row-major `shape`.
    pub fn from_slice(client: &ComputeClient<R>, data: &[E], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        ensure!(
            n == data.len(),
            "shape {shape:?} holds {n} elements but {} were given",
            data.len()
        );
        ensure!(n > 0, "cannot create an empty tensor of shape {shape:?}");
        Ok(Self {
            handle: client.create_from_slice(E::as_bytes(data)),
            shape: shape.to_vec(),
            _r: PhantomData,
            _e: PhantomData,
        })
    }

    /// Allocates an uninitialised tensor.
    pub fn empty(client: &ComputeClient<R>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        ensure!(n > 0, "cannot create an empty tensor of shape {shape:?}");
        Ok(Self {
            handle: client.empty(n * size_of::<E>()),
            shape: shape.to_vec(),
            _r: PhantomData,
            _e: PhantomData,
        })
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The array argument for a kernel launch.
    pub fn arg(&self) -> ArrayArg<R> {
        // SAFETY: the handle was allocated with exactly `len()` elements of `E`.
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len()) }
    }

    /// Reads the tensor back to the host (waits for pending work; surfaces launch errors).
    pub fn to_vec(&self, client: &ComputeClient<R>) -> Result<Vec<E>> {
        check_launches(client)?;
        let bytes = client
            .read_one(self.handle.clone())
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("reading a tensor back from the device")?;
        Ok(E::from_bytes(&bytes)[..self.len()].to_vec())
    }
}

/// Submits queued work and turns any launch error the runtime recorded (too much shared
/// memory, too many units, ...) into an error. Reads alone do not report them.
pub fn check_launches<R: Runtime>(client: &ComputeClient<R>) -> Result<()> {
    client
        .flush()
        .map_err(|e| anyhow::anyhow!("a kernel launch failed: {e:?}"))
}

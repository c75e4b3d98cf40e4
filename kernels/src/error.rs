//! Why a launch function refused its arguments.
//!
//! The launch functions return `anyhow::Result`, so callers chain them with `?`; the refusals
//! they raise (`ensure!(cond, KernelError::...)`) are a [`KernelError`], which a caller or a test
//! inspects with `err.downcast_ref::<KernelError>()` instead of matching message text.

/// A kernel launch refused before anything ran on the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// An argument's shape does not fit the kernel or the other arguments.
    #[error("{op}: {arg} must be {expected}, got {got:?}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        /// The expected shape, as the user would write it (e.g. `[896]`, `[tokens, 128]`).
        expected: String,
        got: Vec<usize>,
    },
    /// Cache positions `start..end` past the KV cache's `capacity`.
    #[error("{op}: positions {start}..{end} exceed the cache of {capacity} positions")]
    PastCache {
        op: &'static str,
        start: usize,
        end: usize,
        capacity: usize,
    },
    /// A RoPE position past the cos/sin tables.
    #[error("rope: position {position} is past the tables ({table} positions)")]
    PastRopeTables { position: usize, table: usize },
    /// A token id outside the vocabulary.
    #[error("embedding: token id {id} is outside the vocabulary of {vocab}")]
    TokenOutsideVocab { id: u32, vocab: usize },
    /// The `cmma` matmul asked for on a device without f16 tensor cores.
    #[error("matmul: this device has no f16 tensor cores (cmma); use the tiled or gemv variant")]
    NoTensorCores,
    /// A size or parameter this kernel does not handle (e.g. a head_dim over 256).
    #[error("{op}: {what}")]
    Unsupported { op: &'static str, what: String },
    /// A scalar argument out of its range (e.g. eps ≤ 0, k = 0).
    #[error("{op}: {what}")]
    InvalidArgument { op: &'static str, what: String },
}

impl KernelError {
    /// A [`KernelError::Shape`]; `expected` is anything printable as the expected shape.
    pub fn shape(
        op: &'static str,
        arg: &'static str,
        expected: impl std::fmt::Display,
        got: &[usize],
    ) -> Self {
        Self::Shape {
            op,
            arg,
            expected: expected.to_string(),
            got: got.to_vec(),
        }
    }

    pub fn unsupported(op: &'static str, what: impl Into<String>) -> Self {
        Self::Unsupported {
            op,
            what: what.into(),
        }
    }

    pub fn invalid(op: &'static str, what: impl Into<String>) -> Self {
        Self::InvalidArgument {
            op,
            what: what.into(),
        }
    }
}

/// Fails with a [`KernelError::Shape`] unless argument `arg` of `op` has the shape of argument
/// `like`; each is given as (name, shape).
pub(crate) fn same_shape(
    op: &'static str,
    (arg, shape): (&'static str, &[usize]),
    (like, like_shape): (&'static str, &[usize]),
) -> anyhow::Result<()> {
    anyhow::ensure!(
        shape == like_shape,
        KernelError::shape(
            op,
            arg,
            format!("{like_shape:?} (the shape of {like})"),
            shape
        )
    );
    Ok(())
}

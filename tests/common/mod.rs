// `!(x <= tol)` on purpose: a NaN must fail every check.
#![allow(clippy::neg_cmp_op_on_partial_ord)]
//! Helpers shared by the integration tests.

pub mod cli;
pub mod golden_ref;
pub mod model;
pub mod teacher;

//! One launch path for kernels that run either through cubecl or inside a CUDA graph: the
//! `launch!` macro (crate-internal) and the [`Rec`] argument that chooses between them.

#[cfg(feature = "cuda")]
pub use crate::graph::GraphRecorder;

/// Stands in for the CUDA graph recorder where CUDA is not built: no value exists.
#[cfg(not(feature = "cuda"))]
pub enum GraphRecorder {}

/// Where a host function's launches go: `None`, cubecl's own launch on `client`; `Some`, the
/// CUDA graph recorder (which compiles the same kernel definitions and launches them itself).
pub type Rec<'a> = Option<&'a mut GraphRecorder>;

/// Launches a `#[cube(launch)]` kernel through cubecl or through the graph recorder, with one
/// argument list. The kernel's parameters must come in this order: arrays, runtime scalars,
/// comptime values (`sizes` are the vector sizes of its `Size` generics).
macro_rules! launch {
    ($rec:expr, $client:expr, $kmod:ident :: $kernel:ident <$($g:ty),*>, $count:expr, $dim:expr;
     sizes [$($size:expr),*];
     arrays [$($arr:expr => $vec:expr),*];
     scalars [$($kind:ident $sc:expr),*];
     comptime [$($ct:expr),*]) => {{
        let count: CubeCount = $count;
        let dim: CubeDim = $dim;
        match $rec {
            None => {
                $kmod::launch::<$($g,)* R>($client, count, dim, $($size,)* $($arr.arg(),)* $($sc,)* $($ct,)*);
                anyhow::Ok(())
            }
            #[cfg(feature = "cuda")]
            Some(g) => {
                let settings = KernelSettings::default()
                    .cube_dim(dim)
                    .address_type(AddressType::U32);
                let kernel = $kmod::$kernel::<$($g,)* cubecl::cuda::CudaRuntime>::new(
                    settings,
                    g.client().clone(),
                    $({ let _ = &$arr; ArrayCompilationArg { inplace: None } },)*
                    $({ let _ = &$sc; },)*
                    $($size,)*
                    $($ct,)*
                );
                let args = crate::graph::GraphArgs::new() $(.array(&$arr, $vec))* $(.$kind($sc))*;
                g.launch(kernel, count, args)
            }
            #[cfg(not(feature = "cuda"))]
            Some(never) => match *never {},
        }
    }};
}

pub(crate) use launch;

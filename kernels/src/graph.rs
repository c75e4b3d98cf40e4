//! CUDA graphs of cubecl kernels (CUDA only).
//!
//! cubecl 0.10 launches every kernel through its server thread (about 6 µs of host time each
//! on an H100) and has no graph API; a decode step of the 0.5B model is ~125 launches. Here the
//! same `#[cube]` kernels are compiled by cubecl's own CUDA compiler (the kernel's generated
//! definition → CUDA C++ → NVRTC, as cubecl-cuda does it), and launched by us through cudarc on
//! our own stream, with the arguments laid out as cubecl lays them out (buffer pointers, then
//! the `__grid_constant__` info struct built with cubecl's own [`InfoBuilder`]). A stream
//! capture of such launches is a CUDA graph that replays a whole step with one call.
//!
//! Buffers stay cubecl's: their device addresses come from `ComputeClient::get_resource` (one
//! CUDA context, the primary one, serves both). cubecl's stream and ours are ordered by hand:
//! [`GraphRecorder::wait_for_cubecl`] before our launches read what cubecl wrote, and
//! [`GraphRecorder::synchronize`] before cubecl reads what ours wrote.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cubecl::cuda::{CudaCompiler, CudaRuntime};
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::{CubeTask, InfoBuilder};
use cubecl_cpp::shared::{CompilationOptions, CppSupportedFeatures};
use cudarc::driver::sys::{CUfunction_attribute, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaStream};

use crate::DeviceTensor;

/// A compiled kernel: PTX, entry point, shared-memory bytes, block dimensions, whether it waits
/// for the kernels before it itself (see [`GRID_DEPENDENCY`]), and its CUDA C++ source.
type CompiledSource = (String, String, u32, (u32, u32, u32), bool, String);

/// The comment `decode`'s kernels place where they start reading what earlier kernels wrote
/// (`grid_dependency()` in `decode.rs`). On sm_90+ it becomes [`GRID_WAIT`], and the kernel is
/// launched with programmatic stream serialization (programmatic dependent launch): the GPU
/// schedules it while the kernel before it still runs, and it waits there.
const GRID_DEPENDENCY: &str = "// cubeqwen:grid-dependency";
/// Waits for the kernels before this one (their writes visible), then lets the next kernel be
/// scheduled.
const GRID_WAIT: &str = "asm volatile(\"griddepcontrol.wait;\" ::: \"memory\");\n\
                         asm volatile(\"griddepcontrol.launch_dependents;\" ::: \"memory\");";

/// The comment [`crate::gridsync::grid_barrier`] places where it needs a memory fence (cubecl
/// 0.10's IR has none); compiled to [`FENCE_CODE`] on every architecture.
const FENCE: &str = "// cubeqwen:fence";
/// Orders this unit's memory accesses before and after it for the whole device.
const FENCE_CODE: &str = "__threadfence();";

/// The arguments of one launch, in the kernel's parameter order: arrays (with the vector size
/// the kernel reads them in) and runtime scalars, laid out as cubecl's `KernelLauncher` does.
#[derive(Default)]
pub struct GraphArgs {
    buffers: Vec<Handle>,
    info: InfoBuilder,
}

impl GraphArgs {
    pub fn new() -> Self {
        Self::default()
    }

    /// An `Array<E>` (`vec` = 1) or `Array<Vector<E, vec>>` parameter.
    pub fn array<R: Runtime, E: CubeElement>(mut self, t: &DeviceTensor<R, E>, vec: usize) -> Self {
        let elem = (size_of::<E>() * vec) as u64;
        self.info.metadata.register_array(
            t.handle.size_in_used() / elem,
            (t.len() / vec) as u64,
            AddressType::U32,
        );
        self.buffers.push(t.handle.clone());
        self
    }

    /// A `usize` parameter (passed as the kernel's 32-bit address type).
    pub fn usize(mut self, v: usize) -> Self {
        let v = u32::try_from(v).expect("a usize kernel argument past u32");
        self.info
            .scalars
            .push_raw(&v.to_le_bytes(), AddressType::U32.unsigned_type());
        self
    }

    /// A `u32` parameter.
    pub fn u32(mut self, v: u32) -> Self {
        self.info.scalars.push(v);
        self
    }

    /// An `f32` parameter.
    pub fn f32(mut self, v: f32) -> Self {
        self.info.scalars.push(v);
        self
    }
}

struct Compiled {
    func: CudaFunction,
    shared_bytes: u32,
    block: (u32, u32, u32),
    /// Launched with programmatic stream serialization (it waits at its grid dependency).
    programmatic: bool,
}

/// Compiles cubecl kernels for CUDA, launches them on its own stream, and captures graphs.
pub struct GraphRecorder {
    client: ComputeClient<CudaRuntime>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    /// Compute capability, major × 10 + minor.
    version: i32,
    options: CompilationOptions,
    compiled: HashMap<KernelId, Compiled>,
    /// Programmatic dependent launch for the kernels that mark their grid dependency: sm_90+,
    /// unless `CUBEQWEN_NO_PDL` is set.
    pdl: bool,
    /// Launches made with programmatic stream serialization so far.
    programmatic_launches: usize,
    /// The `get_resource` guards of the cubecl buffers our launches use, by device address.
    guards: HashMap<u64, Box<dyn std::any::Any>>,
}

impl GraphRecorder {
    pub fn new(client: &ComputeClient<CudaRuntime>) -> Result<Self> {
        let ctx = CudaContext::new(0).context("opening the CUDA context for graphs")?;
        let stream = ctx.new_stream()?;
        let major = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )?;
        let minor = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        )?;
        let version = major * 10 + minor;
        // As cubecl-cuda sets them up for this architecture (cubecl-cuda runtime.rs).
        let options = CompilationOptions {
            warp_size: 32,
            supports_features: CppSupportedFeatures {
                fast_math: true,
                grid_constants: version >= 70,
                fast_tanh: version >= 75,
                clusters: version >= 90,
                elect_sync: version >= 90,
            },
        };
        ensure!(
            version >= 70,
            "CUDA graphs of cubecl kernels need compute capability 7.0 (grid constants), found {major}.{minor}"
        );
        let arch = if version >= 90 {
            format!("sm_{version}a")
        } else {
            format!("sm_{version}")
        };
        Ok(Self {
            client: client.clone(),
            ctx,
            stream,
            arch,
            version,
            options,
            compiled: HashMap::new(),
            pdl: version >= 90 && std::env::var_os("CUBEQWEN_NO_PDL").is_none(),
            programmatic_launches: 0,
            guards: HashMap::new(),
        })
    }

    /// Launches made with programmatic dependent launch so far (0 before sm_90 or with
    /// `CUBEQWEN_NO_PDL` set).
    pub fn programmatic_launches(&self) -> usize {
        self.programmatic_launches
    }

    /// The cubecl client the kernels' definitions are made for.
    pub fn client(&self) -> &ComputeClient<CudaRuntime> {
        &self.client
    }

    fn compile<K: CubeKernel>(&mut self, kernel: K) -> Result<&Compiled> {
        let id = kernel.id();
        if !self.compiled.contains_key(&id) {
            // PTX is kept in the kernel cache (as cubecl keeps its own), so a second run
            // compiles nothing: file name from cubecl's stable hash of the kernel and the arch.
            let dir = crate::runtime::kernel_cache_dir().join("graph");
            // "-g1": the grid-dependency rewrite (GRID_WAIT) is part of the PTX.
            let name = format!(
                "{}-{}-g1",
                fnv64(&format!("{:?}", id.stable_hash())),
                self.arch
            );
            let (ptx_path, meta_path) = (
                dir.join(format!("{name}.ptx")),
                dir.join(format!("{name}.meta")),
            );
            let cached = (!crate::runtime::kernel_cache_disabled())
                .then(|| {
                    Some((
                        std::fs::read_to_string(&ptx_path).ok()?,
                        std::fs::read_to_string(&meta_path).ok()?,
                    ))
                })
                .flatten()
                .and_then(|(ptx, meta)| {
                    let mut f = meta.split_whitespace();
                    let entry = f.next()?.to_string();
                    let nums: Vec<u32> = f.map(|v| v.parse().ok()).collect::<Option<_>>()?;
                    (nums.len() == 5).then(|| {
                        let block = (nums[1], nums[2], nums[3]);
                        (ptx, entry, nums[0], block, nums[4] == 1)
                    })
                });
            let (ptx, entry, shared_bytes, block, waits) = match cached {
                Some(c) => c,
                None => {
                    let c = self.compile_source(kernel)?;
                    if !crate::runtime::kernel_cache_disabled() {
                        // A cache that cannot be written only costs time on the next run. The
                        // CUDA source is kept beside the PTX for reading (profiling), not used.
                        let _ = std::fs::create_dir_all(&dir).and_then(|_| {
                            std::fs::write(dir.join(format!("{name}.cu")), &c.5)?;
                            std::fs::write(&ptx_path, &c.0)?;
                            std::fs::write(
                                &meta_path,
                                format!(
                                    "{} {} {} {} {} {}",
                                    c.1, c.2, c.3 .0, c.3 .1, c.3 .2, c.4 as u32
                                ),
                            )
                        });
                    }
                    (c.0, c.1, c.2, c.3, c.4)
                }
            };
            let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))?;
            let func = module.load_function(&entry)?;
            // SAFETY: a valid function handle; the size is what the kernel declares.
            unsafe {
                cudarc::driver::result::function::set_function_attribute(
                    func.cu_function(),
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )?;
            }
            self.compiled.insert(
                id.clone(),
                Compiled {
                    func,
                    shared_bytes,
                    block,
                    programmatic: waits && self.pdl,
                },
            );
        }
        Ok(&self.compiled[&id])
    }

    /// cubecl's CUDA C++ for `kernel`, compiled by NVRTC as cubecl-cuda compiles it: (PTX,
    /// entry point, shared-memory bytes, block dimensions).
    fn compile_source<K: CubeKernel>(&self, kernel: K) -> Result<CompiledSource> {
        let task = cubecl::prelude::KernelTask::<CudaCompiler, K>::new(kernel);
        let out = task
            .compile(
                &mut Default::default(),
                &self.options,
                ExecutionMode::Checked,
                task.address_type(),
            )
            .map_err(|e| anyhow::anyhow!("cubecl could not compile a kernel: {e:?}"))?;
        let repr = out.repr.context("the CUDA compiler returned no kernel")?;
        // The grid-dependency marker: the wait on Hopper, nothing before it.
        let waits = self.version >= 90 && out.source.contains(GRID_DEPENDENCY);
        let source = if waits {
            out.source.replace(GRID_DEPENDENCY, GRID_WAIT)
        } else {
            out.source.clone()
        };
        let source = source.replace(FENCE, FENCE_CODE);
        let include = cubecl::cuda::install::include_path();
        let mut includes = vec![include.to_string_lossy().into_owned()];
        let cccl = include.join("cccl");
        if cccl.exists() {
            includes.push(cccl.to_string_lossy().into_owned());
        }
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(
            &source,
            cudarc::nvrtc::CompileOptions {
                include_paths: includes,
                options: vec![
                    format!("--gpu-architecture={}", self.arch),
                    "-lineinfo".into(),
                ],
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("NVRTC: {e:?}\n{source}"))?;
        let d = out.cube_dim;
        Ok((
            ptx.to_src(),
            out.entrypoint_name,
            repr.shared_memory_size() as u32,
            (d.x, d.y, d.z),
            waits,
            source,
        ))
    }

    /// The device address of a cubecl buffer (valid while the buffer lives; the recorder keeps
    /// cubecl's guard for it).
    pub fn address(&mut self, handle: &Handle) -> Result<u64> {
        let res = self
            .client
            .get_resource(handle.clone())
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("getting a cubecl buffer's device address")?;
        let ptr = res.resource().ptr;
        self.guards.entry(ptr).or_insert_with(|| Box::new(res));
        Ok(ptr)
    }

    /// Launches `kernel` (a cubecl kernel definition, as its `launch` function would build it)
    /// on our stream with `args`; inside [`GraphRecorder::capture`] it becomes a graph node.
    pub fn launch<K: CubeKernel>(
        &mut self,
        kernel: K,
        count: CubeCount,
        args: GraphArgs,
    ) -> Result<()> {
        let CubeCount::Static(gx, gy, gz) = count else {
            bail!("graph launches take static cube counts");
        };
        let GraphArgs { buffers, mut info } = args;
        let mut ptrs = buffers
            .iter()
            .map(|h| self.address(h))
            .collect::<Result<Vec<u64>>>()?;
        let info = info.finish(AddressType::U32);
        ensure!(
            info.dynamic_metadata_offset == info.data.len(),
            "graph launches take arrays only (no dynamic metadata)"
        );
        let (func, block, shared, programmatic) = {
            let c = self.compile(kernel)?;
            (
                c.func.cu_function(),
                c.block,
                c.shared_bytes,
                c.programmatic,
            )
        };
        let mut params: Vec<*mut c_void> = ptrs
            .iter_mut()
            .map(|p| p as *mut u64 as *mut c_void)
            .collect();
        params.push(info.data.as_ptr() as *mut c_void);
        self.ctx.bind_to_thread()?;
        // SAFETY: `func` was compiled from this kernel's definition; `params` are, in order, the
        // device addresses of its buffers and its info struct, alive until this call returns
        // (the driver copies them).
        unsafe {
            if programmatic {
                use cudarc::driver::sys;
                let mut attr = sys::CUlaunchAttribute {
                    id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                    pad: [0; 4],
                    value: sys::CUlaunchAttributeValue {
                        programmaticStreamSerializationAllowed: 1,
                    },
                };
                let config = sys::CUlaunchConfig {
                    gridDimX: gx,
                    gridDimY: gy,
                    gridDimZ: gz,
                    blockDimX: block.0,
                    blockDimY: block.1,
                    blockDimZ: block.2,
                    sharedMemBytes: shared,
                    hStream: self.stream.cu_stream(),
                    attrs: &mut attr,
                    numAttrs: 1,
                };
                sys::cuLaunchKernelEx(&config, func, params.as_mut_ptr(), std::ptr::null_mut())
                    .result()?;
                self.programmatic_launches += 1;
            } else {
                cudarc::driver::result::launch_kernel(
                    func,
                    (gx, gy, gz),
                    block,
                    shared,
                    self.stream.cu_stream(),
                    &mut params,
                )?;
            }
        }
        Ok(())
    }

    /// Waits for every cubecl launch and upload so far (our launches may read their results).
    pub fn wait_for_cubecl(&self) -> Result<()> {
        cubecl::future::block_on(self.client.sync()).map_err(|e| anyhow::anyhow!("{e:?}"))
    }

    /// Waits for our stream (cubecl may then read what our launches wrote).
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Records the launches `body` makes into a graph instead of running them.
    pub fn capture(&mut self, body: impl FnOnce(&mut Self) -> Result<()>) -> Result<CudaGraph> {
        self.ctx.bind_to_thread()?;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let result = body(self);
        let graph = self.stream.end_capture(
            cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        result?;
        graph?.context("the captured graph is empty")
    }

    /// Copies device memory at `address` (from [`GraphRecorder::address`]) to the host after
    /// everything queued on our stream, and waits for it.
    ///
    /// # Safety
    /// `address .. address + out.len()` must lie inside a live buffer.
    pub unsafe fn read(&self, address: u64, out: &mut [u8]) -> Result<()> {
        self.ctx.bind_to_thread()?;
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(out, address, self.stream.cu_stream())?;
        }
        self.synchronize()
    }

    /// [`GraphRecorder::read`] of `out.len()` f32 values.
    ///
    /// # Safety
    /// As [`GraphRecorder::read`], for `4 * out.len()` bytes.
    pub unsafe fn read_f32(&self, address: u64, out: &mut [f32]) -> Result<()> {
        let mut bytes = vec![0u8; out.len() * 4];
        unsafe { self.read(address, &mut bytes)? };
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        Ok(())
    }

    /// Sets the u32 at `address` to `v`, ordered on our stream (a memset: nothing on the host
    /// to keep alive, so it returns at once; what runs after it on the stream sees `v`).
    ///
    /// # Safety
    /// `address .. address + 4` must lie inside a live buffer.
    pub unsafe fn set_u32(&self, address: u64, v: u32) -> Result<()> {
        self.ctx.bind_to_thread()?;
        unsafe {
            cudarc::driver::sys::cuMemsetD32Async(address, v, 1, self.stream.cu_stream())
                .result()?;
        }
        Ok(())
    }
}

/// FNV-1a, for cache file names.
fn fnv64(s: &str) -> String {
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

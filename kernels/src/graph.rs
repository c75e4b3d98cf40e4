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
//!
//! With `CUBEQWEN_TIMELINE` set (or [`GraphRecorder::with_timeline`]) the recorder compiles
//! its kernels with per-warp timestamps: [`GraphRecorder::timeline_read`] and
//! [`timeline_summary`] show when each launch of a graph started, got past its grid-dependency
//! wait and ended (`Timeline`).

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

/// The comment `decode`'s streamed kernels place after a group of `cp.async` copies (cubecl
/// 0.10 has no copy groups, only barriers): compiled to [`COMMIT_CODE`].
const COMMIT: &str = "// cubeqwen:cp-async-commit";
const COMMIT_CODE: &str = "asm volatile(\"cp.async.commit_group;\" ::: \"memory\");";
/// The comment (followed by N, 0 to 3) where a unit waits until at most N of its copy groups
/// are in flight: `cp.async.wait_group N`.
const WAIT_GROUP: &str = "// cubeqwen:cp-async-wait-";
/// What cubecl's `cp.async` helpers need (`cuda::barrier`).
const BARRIER_HEADER: &str = "#include <cuda/barrier>";

/// `source` with the copy-group markers ([`COMMIT`], [`WAIT_GROUP`]) compiled. A kernel with
/// `cp.async` copies but no cubecl barrier lacks the header that cubecl's copy helpers need
/// (cubecl includes it with barriers only): it is added.
fn copy_groups(source: &str) -> Result<String> {
    let mut out = String::with_capacity(source.len() + 32);
    if source.contains("__cp_async_shared_global") && !source.contains(BARRIER_HEADER) {
        out.push_str(BARRIER_HEADER);
        out.push('\n');
    }
    let mut rest = source.replace(COMMIT, COMMIT_CODE);
    while let Some(at) = rest.find(WAIT_GROUP) {
        out.push_str(&rest[..at]);
        let after = &rest[at + WAIT_GROUP.len()..];
        let n = after.chars().next().filter(|c| ('0'..='3').contains(c));
        let n = n.with_context(|| {
            format!(
                "a copy-group wait without a count 0..3: {WAIT_GROUP}{}",
                &after[..after.len().min(8)]
            )
        })?;
        out.push_str(&format!(
            "asm volatile(\"cp.async.wait_group {n};\" ::: \"memory\");"
        ));
        rest = after[1..].to_string();
    }
    out.push_str(&rest);
    Ok(out)
}

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
    /// Entry point (the kernel's name).
    entry: String,
    /// Its number in the order of compilation (the timeline's kernel id).
    index: usize,
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
    /// cubecl's bounds checks in the kernels: none (`Unchecked`: every launch function checks
    /// its shapes, and each kernel guards its own edges; H100, 2026-11-28: tg128 0.5B +3–7%,
    /// at depth 4096 +8–10%, 1.5B +7%; compute-sanitizer's memcheck clean), or with
    /// `CUBEQWEN_GRAPH_CHECKED` set, cubecl's (`Checked`: a read out of bounds gives 0, a
    /// write is dropped).
    mode: ExecutionMode,
    /// Per-warp timestamps of our kernels (`CUBEQWEN_TIMELINE` set; see [`Timeline`]).
    timeline: Option<Timeline>,
}

impl GraphRecorder {
    /// A recorder; with `CUBEQWEN_TIMELINE` set, one that keeps a timeline
    /// ([`GraphRecorder::with_timeline`]).
    pub fn new(client: &ComputeClient<CudaRuntime>) -> Result<Self> {
        Self::with_timeline(client, crate::switches::switches()?.timeline)
    }

    /// A recorder whose kernels, with `timeline`, record when each warp starts, gets past its
    /// grid-dependency wait and ends ([`GraphRecorder::timeline_read`]).
    pub fn with_timeline(client: &ComputeClient<CudaRuntime>, timeline: bool) -> Result<Self> {
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
        let switches = crate::switches::switches()?;
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
            pdl: version >= 90 && !switches.no_pdl,
            mode: if switches.graph_checked {
                ExecutionMode::Checked
            } else {
                ExecutionMode::Unchecked
            },
            programmatic_launches: 0,
            guards: HashMap::new(),
            timeline: timeline.then(Timeline::new).transpose()?,
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
            let dir = crate::runtime::kernel_cache_build_dir().join("graph");
            // "-g2": the grid-dependency and copy-group rewrites (GRID_WAIT, copy_groups) are
            // part of the PTX; "-u": compiled without bounds checks.
            let name = format!(
                "{}-{}-g2{}",
                fnv64(&format!("{:?}", id.stable_hash())),
                self.arch,
                if self.mode == ExecutionMode::Unchecked {
                    "-u"
                } else {
                    ""
                }
            );
            let (ptx_path, meta_path) = (
                dir.join(format!("{name}.ptx")),
                dir.join(format!("{name}.meta")),
            );
            // Timeline builds bake the kernel's number and a buffer address in: never cached.
            let cache = !crate::runtime::kernel_cache_disabled() && self.timeline.is_none();
            let index = self.compiled.len();
            let cached = cache
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
                    let c = self.compile_source(kernel, index)?;
                    if cache {
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
                    entry,
                    index,
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
    fn compile_source<K: CubeKernel>(&self, kernel: K, index: usize) -> Result<CompiledSource> {
        let task = cubecl::prelude::KernelTask::<CudaCompiler, K>::new(kernel);
        let out = task
            .compile(
                &mut Default::default(),
                &self.options,
                self.mode,
                task.address_type(),
            )
            .map_err(|e| anyhow::anyhow!("cubecl could not compile a kernel: {e:?}"))?;
        let repr = out.repr.context("the CUDA compiler returned no kernel")?;
        // The grid-dependency marker: the wait on Hopper, nothing before it.
        let waits = self.version >= 90 && out.source.contains(GRID_DEPENDENCY);
        let source = match (waits, &self.timeline) {
            (true, Some(_)) => out
                .source
                .replace(GRID_DEPENDENCY, &format!("{GRID_WAIT}\n{TIMELINE_WAIT}")),
            (true, None) => out.source.replace(GRID_DEPENDENCY, GRID_WAIT),
            (false, _) => out.source.clone(),
        };
        let source = match &self.timeline {
            Some(t) => instrument(&source, t.buf, index)?,
            None => source,
        };
        let source = copy_groups(&source.replace(FENCE, FENCE_CODE))?;
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
        let timeline = self.timeline.is_some();
        let (func, block, shared, programmatic, named) = {
            let c = self.compile(kernel)?;
            (
                c.func.cu_function(),
                c.block,
                c.shared_bytes,
                c.programmatic,
                // The kernel's number and name, for the timeline only.
                timeline.then(|| (c.index, c.entry.clone())),
            )
        };
        if let (Some(t), Some((kernel, name))) = (self.timeline.as_mut(), named) {
            let threads = block.0 * block.1 * block.2;
            t.launches.push(TimelineLaunch {
                kernel,
                name,
                cubes: gx * gy * gz,
                warps: gx * gy * gz * threads.div_ceil(32),
            });
        }
        let mut params: Vec<*mut c_void> = ptrs
            .iter_mut()
            .map(|p| p as *mut u64 as *mut c_void)
            .collect();
        params.push(info.data.as_ptr() as *mut c_void);
        self.ctx.bind_to_thread()?;
        let stream = self.stream.cu_stream();
        // One launch call either way: the programmatic attribute is passed only where the
        // kernel waits at its grid dependency (and PDL is on).
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
            hStream: stream,
            attrs: &mut attr,
            numAttrs: programmatic as u32,
        };
        // SAFETY: `func` was compiled from this kernel's definition; `params` are, in order, the
        // device addresses of its buffers and its info struct, alive until this call returns
        // (the driver copies them).
        unsafe {
            sys::cuLaunchKernelEx(&config, func, params.as_mut_ptr(), std::ptr::null_mut())
                .result()?;
        }
        if programmatic {
            self.programmatic_launches += 1;
        }
        Ok(())
    }

    /// With a timeline: the launches of the last [`GraphRecorder::capture`] (or of all launches
    /// since the recorder was made, when nothing was captured), in order; else empty.
    pub fn timeline_launches(&self) -> Vec<TimelineLaunch> {
        self.timeline
            .as_ref()
            .map_or(Vec::new(), |t| t.launches.clone())
    }

    /// With a timeline: forgets the timestamps so far (ordered on our stream), so that the
    /// next graph launch's are the only ones. Without one, nothing.
    pub fn timeline_reset(&self) -> Result<()> {
        let Some(t) = &self.timeline else {
            return Ok(());
        };
        self.ctx.bind_to_thread()?;
        // SAFETY: the counter is the first 4 bytes of the timeline's buffer.
        unsafe {
            cudarc::driver::sys::cuMemsetD32Async(t.buf, 0, 1, self.stream.cu_stream()).result()?;
        }
        Ok(())
    }

    /// With a timeline: waits for our stream and reads the timestamps since
    /// [`GraphRecorder::timeline_reset`], which must have been taken by exactly the warps of
    /// `launches` (one graph launch of them).
    pub fn timeline_read(&self, launches: &[TimelineLaunch]) -> Result<Vec<LaunchTimes>> {
        let t = self
            .timeline
            .as_ref()
            .context("no timeline (set CUBEQWEN_TIMELINE)")?;
        self.synchronize()?;
        t.read(launches)
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
        if let Some(t) = self.timeline.as_mut() {
            t.launches.clear();
        }
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

/// Written after the grid-dependency wait in timeline builds: the warp's time past the wait.
const TIMELINE_WAIT: &str = "if (cq_e) { cq_e[2] = cq_now(); }";
/// Warps a timeline holds at most (4 timestamps of 8 bytes each: 64 MiB).
const TIMELINE_WARPS: usize = 1 << 21;

/// Per-warp timestamps of our kernels, for profiling a CUDA graph from the inside (the GPU
/// machine has no Nsight Systems, and ncu replays kernels one by one, so neither shows how a
/// graph's kernels overlap). With `CUBEQWEN_TIMELINE` set, the recorder compiles every kernel
/// with a prologue in which each cube takes a slot a warp in one device buffer (one atomic a
/// cube) and lane 0 of each warp writes the kernel's number and `%globaltimer` (ns) at its
/// start, after its grid-dependency wait and when it returns. The kernels are then a little
/// slower (an atomic and a barrier a cube, three stores a warp): a timeline shows where a
/// step's time goes, not its speed.
struct Timeline {
    /// Device buffer: a u32 counter (in the first u64), then [kernel, start, wait, end] u64s
    /// per warp.
    buf: u64,
    launches: Vec<TimelineLaunch>,
}

/// One launch as the timeline knows it: the kernel's number and name, cubes and warps.
#[derive(Clone, Debug)]
pub struct TimelineLaunch {
    pub kernel: usize,
    pub name: String,
    pub cubes: u32,
    pub warps: u32,
}

/// When a launch's warps started, got past their grid-dependency wait and ended (ns of
/// `%globaltimer`; `wait` is `None` for kernels without one).
#[derive(Clone, Debug)]
pub struct LaunchTimes {
    pub launch: TimelineLaunch,
    /// The first warp's start.
    pub start: u64,
    /// The first warp past its wait (when the kernels before had finished).
    pub wait: Option<u64>,
    /// The last warp's end.
    pub end: u64,
    /// How the warps spread between those (`None` where built by hand, as in tests).
    pub spread: Option<Spread>,
}

/// Where a launch's warps are between its first start and its last end (ns of
/// `%globaltimer`): the last warp's start, the median and last warp past its wait (the
/// warp's start for kernels without one), and the median warp's end. A late last start says
/// the launch's cubes waited for room on the multiprocessors; a late median wait, that they
/// waited for the kernel before; a median end far before the last, a tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spread {
    pub start_last: u64,
    pub wait_median: u64,
    pub wait_last: u64,
    pub end_median: u64,
}

impl Spread {
    /// Of `[start, wait, end]` a warp (`wait` 0: none); `None` for no warps.
    fn of(warps: &[[u64; 3]]) -> Option<Self> {
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let past: Vec<u64> = warps
            .iter()
            .map(|w| if w[1] > 0 { w[1] } else { w[0] })
            .collect();
        Some(Self {
            start_last: warps.iter().map(|w| w[0]).max()?,
            wait_median: median(past.clone()),
            wait_last: past.into_iter().max()?,
            end_median: median(warps.iter().map(|w| w[2]).collect()),
        })
    }
}

impl Timeline {
    fn new() -> Result<Self> {
        // SAFETY: a plain device allocation, freed in Drop.
        let buf = unsafe { cudarc::driver::result::malloc_sync(8 + TIMELINE_WARPS * 32)? };
        unsafe { cudarc::driver::result::memset_d8_sync(buf, 0, 8)? };
        Ok(Self {
            buf,
            launches: Vec::new(),
        })
    }

    /// The launches' times from the buffer (see [`GraphRecorder::timeline_read`]).
    fn read(&self, launches: &[TimelineLaunch]) -> Result<Vec<LaunchTimes>> {
        let mut count = [0u32; 2];
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut count, self.buf)? };
        let n = count[0] as usize;
        let want: usize = launches.iter().map(|l| l.warps as usize).sum();
        ensure!(
            n == want && n <= TIMELINE_WARPS,
            "timeline: {n} warps recorded, the launches have {want} (at most {TIMELINE_WARPS} fit)"
        );
        let mut raw = vec![0u64; 4 * n];
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut raw, self.buf + 8)? };
        // Each kernel's warps in the order their cubes took their slots (one atomic counter: a
        // total order, unlike timestamps, which need not agree to the tick across
        // multiprocessors); its launches take them in turn. A launch's cubes all take their
        // slots before the next launch of the chain starts: they do it first thing, and the
        // next launch starts only after every cube of this one has got past its wait (or
        // ended).
        let mut by_kernel: HashMap<usize, Vec<[u64; 3]>> = HashMap::new();
        for e in raw.chunks_exact(4) {
            by_kernel
                .entry(e[0] as usize)
                .or_default()
                .push([e[1], e[2], e[3]]);
        }
        let mut taken: HashMap<usize, usize> = HashMap::new();
        let mut out = Vec::with_capacity(launches.len());
        for l in launches {
            let at = taken.entry(l.kernel).or_default();
            let all = by_kernel.get(&l.kernel).map_or(&[][..], |w| &w[..]);
            let warps = all
                .get(*at..*at + l.warps as usize)
                .context("timeline: fewer warps of a kernel than its launches have")?;
            *at += l.warps as usize;
            out.push(LaunchTimes {
                launch: l.clone(),
                start: warps.iter().map(|w| w[0]).min().unwrap_or(0),
                wait: warps.iter().map(|w| w[1]).filter(|&t| t > 0).min(),
                end: warps.iter().map(|w| w[2]).max().unwrap_or(0),
                spread: Spread::of(warps),
            });
        }
        Ok(out)
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_sync in `new`, freed once.
        let _ = unsafe { cudarc::driver::result::free_sync(self.buf) };
    }
}

/// `source` with the timeline's prologue in its kernel (number `index`; timestamps into the
/// buffer at device address `buf`).
fn instrument(source: &str, buf: u64, index: usize) -> Result<String> {
    let (head, kernel) = source
        .split_once("extern \"C\" __global__")
        .context("timeline: no kernel in the source")?;
    let (signature, body) = kernel
        .split_once("\n) {\n")
        .context("timeline: the kernel's signature does not end as expected")?;
    // One atomic a cube (its thread 0 takes a slot for each of its warps), not one a warp:
    // thousands of warps on one counter cost microseconds a launch.
    let prologue = format!(
        "unsigned long long* cq_e = nullptr;\n\
         {{ __shared__ unsigned cq_base;\n\
         const unsigned cq_t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;\n\
         const unsigned long long cq_t0 = cq_now();\n\
         unsigned long long* cq_b = (unsigned long long*){buf}ull;\n\
         if (cq_t == 0u) {{ cq_base = atomicAdd((unsigned*)cq_b, (blockDim.x * blockDim.y * blockDim.z + 31u) / 32u); }}\n\
         __syncthreads();\n\
         const unsigned cq_s = cq_base + cq_t / 32u;\n\
         if ((cq_t & 31u) == 0u && cq_s < {cap}u) {{ cq_e = cq_b + 1 + 4ull * cq_s; cq_e[0] = {index}ull; cq_e[1] = cq_t0; cq_e[2] = 0ull; }}\n\
         }}\n\
         CqTimelineEnd cq_end{{cq_e}};\n",
        cap = TIMELINE_WARPS,
    );
    let helpers = "__device__ __forceinline__ unsigned long long cq_now() {\n\
         unsigned long long t; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t)); return t; }\n\
         struct CqTimelineEnd { unsigned long long* e;\n\
         __device__ ~CqTimelineEnd() { if (e) { e[3] = cq_now(); } } };\n";
    Ok(format!(
        "{head}{helpers}extern \"C\" __global__{signature}\n) {{\n{prologue}{body}"
    ))
}

/// A timeline as text: each launch's start, wait and end relative to the first start (µs),
/// and per kernel its mean time from the end of the launch before to being past its wait
/// (the boundary) and from there to its end (the body).
pub fn timeline_summary(times: &[LaunchTimes]) -> String {
    use std::fmt::Write;
    let Some(t0) = times.iter().map(|t| t.start).min() else {
        return "timeline: no launches\n".into();
    };
    let us = |t: u64| (t as f64 - t0 as f64) / 1e3;
    let mut out = String::new();
    // Per kernel (its number, name and cube count), in order of first launch: launches and
    // the sums of their boundary, body and resident times.
    let mut kinds: PerKernel<4> = Vec::new();
    let _ = writeln!(
        out,
        "| # | kernel | cubes | start µs | past wait µs | end µs | boundary µs | body µs |\n|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    let mut prev_end = None;
    for (i, t) in times.iter().enumerate() {
        let past = t.wait.unwrap_or(t.start);
        let boundary = prev_end.map_or(0.0, |p: u64| (past as f64 - p as f64) / 1e3);
        let body = (t.end as f64 - past as f64) / 1e3;
        let _ = writeln!(
            out,
            "| {i} | {} | {} | {:.2} | {:.2} | {:.2} | {boundary:.2} | {body:.2} |",
            t.launch.name,
            t.launch.cubes,
            us(t.start),
            us(past),
            us(t.end),
        );
        let resident = (t.end as f64 - t.start as f64) / 1e3;
        add_per_kernel(&mut kinds, t, [1.0, boundary, body, resident]);
        prev_end = Some(t.end);
    }
    let total = times.iter().map(|t| t.end).max().unwrap_or(t0);
    let _ = writeln!(
        out,
        "\nstep: {:.2} µs from the first start to the last end\n\n| kernel | cubes | launches | boundary µs (mean) | body µs (mean) | resident µs (mean) |\n|---|---:|---:|---:|---:|---:|",
        us(total)
    );
    for ((_, name, cubes), [n, b, d, r]) in kinds {
        let _ = writeln!(
            out,
            "| {name} | {cubes} | {n} | {:.2} | {:.2} | {:.2} |",
            b / n,
            d / n,
            r / n
        );
    }
    spread_summary(&mut out, times);
    out
}

/// Sums per kernel (its number, name and cube count), in the order of its first launch.
type PerKernel<const N: usize> = Vec<((usize, String, u32), [f64; N])>;

/// Adds `v` to the sums of `t`'s kernel (a new row at its first launch).
fn add_per_kernel<const N: usize>(kinds: &mut PerKernel<N>, t: &LaunchTimes, v: [f64; N]) {
    let key = (t.launch.kernel, t.launch.name.clone(), t.launch.cubes);
    match kinds.iter_mut().find(|k| k.0 == key) {
        Some(k) => k.1.iter_mut().zip(v).for_each(|(sum, x)| *sum += x),
        None => kinds.push((key, v)),
    }
}

/// Per kernel, the means over its launches of where its warps spread ([`Spread`]), in µs:
/// first start → last start, first past the wait → median and last past it, median past the
/// wait → median end, median end → last end. Nothing where no launch has a spread.
fn spread_summary(out: &mut String, times: &[LaunchTimes]) {
    use std::fmt::Write;
    let mut kinds: PerKernel<6> = Vec::new();
    for t in times {
        let Some(s) = t.spread else { continue };
        let first_wait = t.wait.unwrap_or(t.start);
        let d = |a: u64, b: u64| (a as f64 - b as f64) / 1e3;
        let v = [
            1.0,
            d(s.start_last, t.start),
            d(s.wait_median, first_wait),
            d(s.wait_last, first_wait),
            d(s.end_median, s.wait_median),
            d(t.end, s.end_median),
        ];
        add_per_kernel(&mut kinds, t, v);
    }
    if kinds.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nwhere the warps are (means over launches, µs):\n\n| kernel | cubes | starts spread | to median past wait | to last past wait | median past wait → median end | median → last end |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for ((_, name, cubes), [n, a, b, c, d, e]) in kinds {
        let _ = writeln!(
            out,
            "| {name} | {cubes} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            a / n,
            b / n,
            c / n,
            d / n,
            e / n
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel as cubecl 0.10 writes it (shortened).
    const KERNEL: &str = "typedef unsigned int uint32;\nextern \"C\" __global__ void __launch_bounds__(256)k_f32 (\n    const float* __restrict__ buffer_0, float* buffer_1, const __grid_constant__ info_st info\n) {\nuint32 threadIdxGlobal = threadIdx.x;\n// cubeqwen:grid-dependency\nbuffer_1[threadIdxGlobal] = buffer_0[threadIdxGlobal];\n}\n";

    #[test]
    fn timeline_summary_takes_boundaries_and_bodies() {
        let launch = |kernel, name: &str| TimelineLaunch {
            kernel,
            name: name.into(),
            cubes: 2,
            warps: 16,
        };
        let at = |launch, start, wait, end| LaunchTimes {
            launch,
            start,
            wait,
            end,
            spread: None,
        };
        // a (no wait) 1000–3000; b resident from 2000, past its wait at 3500, ends 6000; a
        // again 6000–7000 (boundary 0); b resident from 6500, past its wait 7400, ends 8000.
        let times = [
            at(launch(0, "a"), 1000, None, 3000),
            at(launch(1, "b"), 2000, Some(3500), 6000),
            at(launch(0, "a"), 6000, None, 7000),
            at(launch(1, "b"), 6500, Some(7400), 8000),
        ];
        let out = timeline_summary(&times);
        assert!(
            out.contains("| 1 | b | 2 | 1.00 | 2.50 | 5.00 | 0.50 | 2.50 |"),
            "{out}"
        );
        assert!(out.contains("step: 7.00 µs"), "{out}");
        // a: boundaries 0 (first) and 0, bodies 2 and 1, resident 2 and 1.
        assert!(out.contains("| a | 2 | 2 | 0.00 | 1.50 | 1.50 |"), "{out}");
        // b: boundaries 0.5 and 0.4, bodies 2.5 and 0.6, resident 4 and 1.5.
        assert!(out.contains("| b | 2 | 2 | 0.45 | 1.55 | 2.75 |"), "{out}");
    }

    #[test]
    fn timeline_spread_takes_quantiles_of_the_warps() {
        // Three warps: starts 100, 130, 400; past the wait 500, 520, 900; ends 700, 800, 2000.
        let warps = [[100, 500, 700], [130, 520, 800], [400, 900, 2000]];
        let s = Spread::of(&warps).unwrap();
        assert_eq!(
            s,
            Spread {
                start_last: 400,
                wait_median: 520,
                wait_last: 900,
                end_median: 800
            }
        );
        // Without a wait, a warp's start stands for it.
        let s = Spread::of(&[[100, 0, 300], [200, 0, 400]]).unwrap();
        assert_eq!((s.wait_median, s.wait_last), (200, 200));
        assert_eq!(Spread::of(&[]), None);
        let launch = TimelineLaunch {
            kernel: 0,
            name: "k".into(),
            cubes: 3,
            warps: 3,
        };
        let t = LaunchTimes {
            launch,
            start: 100,
            wait: Some(500),
            end: 2000,
            spread: Spread::of(&warps),
        };
        let out = timeline_summary(&[t]);
        // starts spread 0.30; to median wait 0.02, to last 0.40; median wait → median end
        // 0.28; median → last end 1.20.
        assert!(
            out.contains("| k | 3 | 0.30 | 0.02 | 0.40 | 0.28 | 1.20 |"),
            "{out}"
        );
    }

    #[test]
    fn timeline_prologue_goes_first_in_the_kernel() {
        let out = instrument(KERNEL, 0x7000, 5).unwrap();
        let (before, after) = out.split_once("extern \"C\" __global__").unwrap();
        assert!(before.contains("typedef unsigned int uint32;") && before.contains("cq_now()"));
        assert!(before.contains("struct CqTimelineEnd"), "{out}");
        let (_, body) = after.split_once("\n) {\n").unwrap();
        assert!(
            body.starts_with("unsigned long long* cq_e = nullptr;"),
            "{body}"
        );
        assert!(body.contains("(unsigned long long*)28672ull") && body.contains("cq_e[0] = 5ull;"));
        assert!(
            body.contains("CqTimelineEnd cq_end{cq_e};\nuint32 threadIdxGlobal"),
            "{body}"
        );
        assert!(instrument("__global__ void f() {}", 0x7000, 0).is_err());
    }

    #[test]
    fn copy_group_markers_compile_to_instructions() {
        let src = "a;\n// cubeqwen:cp-async-commit\nb;\n// cubeqwen:cp-async-wait-2\nc;\n\
                   // cubeqwen:cp-async-wait-0\n";
        let out = copy_groups(src).unwrap();
        assert_eq!(
            out,
            "a;\nasm volatile(\"cp.async.commit_group;\" ::: \"memory\");\nb;\n\
             asm volatile(\"cp.async.wait_group 2;\" ::: \"memory\");\nc;\n\
             asm volatile(\"cp.async.wait_group 0;\" ::: \"memory\");\n"
        );
        assert_eq!(copy_groups(KERNEL).unwrap(), KERNEL);
        let copies = "x;\n__cp_async_shared_global<16>(a, b);\n";
        assert_eq!(
            copy_groups(copies).unwrap(),
            format!("{BARRIER_HEADER}\n{copies}")
        );
        let with = format!("{BARRIER_HEADER}\n{copies}");
        assert_eq!(copy_groups(&with).unwrap(), with);
        assert!(copy_groups("// cubeqwen:cp-async-wait-7\n").is_err());
        assert!(copy_groups("// cubeqwen:cp-async-wait-").is_err());
    }
}

//! Picking the device: `auto` (CUDA when a driver and a GPU answer, else wgpu), `cuda` or `wgpu`.
//!
//! Code that runs kernels is written once, generic over `R: Runtime`, as a [`RuntimeJob`];
//! [`dispatch`] runs it on the picked device.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};
use cubecl::prelude::*;

/// The device a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Auto,
    Cuda,
    Wgpu,
}

impl FromStr for DeviceKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda),
            "wgpu" => Ok(Self::Wgpu),
            other => bail!("unknown device `{other}`: expected auto, cuda or wgpu"),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cuda => "cuda",
            Self::Wgpu => "wgpu",
        })
    }
}

/// Work that runs on whichever runtime was picked.
pub trait RuntimeJob {
    type Output;
    /// `device` describes the picked device for the user, e.g. "cuda:0 (NVIDIA H100 80GB HBM3)".
    fn run<R: Runtime>(self, client: ComputeClient<R>, device: &str) -> Result<Self::Output>;
}

/// Why CUDA cannot be used here, or `None` when a CUDA device answers.
pub fn cuda_unavailable_reason() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::{result, sys};
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            return Some("no CUDA driver library (libcuda.so) was found".into());
        }
        if let Err(e) = result::init() {
            return Some(format!("the CUDA driver failed to initialise: {e:?}"));
        }
        match result::device::get_count() {
            Ok(0) => Some("the CUDA driver reports no GPU".into()),
            Ok(_) => None,
            Err(e) => Some(format!("the CUDA driver could not count GPUs: {e:?}")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        Some("this build of cubeqwen has no CUDA support (cargo feature `cuda` is off)".into())
    }
}

/// Where compiled kernels are cached between runs: `$CUBEQWEN_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/cubeqwen/kernels`, else `~/.cache/cubeqwen/kernels`.
pub fn kernel_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CUBEQWEN_KERNEL_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("cubeqwen").join("kernels")
}

/// This build's part of the kernel cache: `build-<hash of the kernels' sources and the lock
/// file>` under [`kernel_cache_dir`]. cubecl keys a cached kernel by its name and comptime
/// arguments, not by its code, so builds must not share one (`kernels/build.rs`).
pub fn kernel_cache_build_dir() -> PathBuf {
    kernel_cache_dir().join(concat!("build-", env!("CUBEQWEN_KERNELS_BUILD")))
}

/// Whether the kernel cache is switched off (`CUBEQWEN_NO_KERNEL_CACHE`).
pub fn kernel_cache_disabled() -> bool {
    std::env::var_os("CUBEQWEN_NO_KERNEL_CACHE").is_some()
}

/// Points cubecl's persistent compilation cache at [`kernel_cache_build_dir`] (once, before any
/// client).
/// CUDA caches compiled PTX there, so a second run does not JIT again.
fn configure_cubecl() {
    use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // What cubecl itself would load (cubecl.toml, CUBECL_* variables), plus our cache.
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() && !kernel_cache_disabled() {
            config.compilation.cache = Some(CacheConfig::File(kernel_cache_build_dir()));
        }
        // Another part of the process may have configured cubecl first; keep theirs then.
        let _ = catch_quietly(|| CubeClRuntimeConfig::set(config));
    });
}

fn resolve(kind: DeviceKind) -> Result<DeviceKind> {
    match kind {
        DeviceKind::Auto => Ok(if cuda_unavailable_reason().is_none() {
            DeviceKind::Cuda
        } else {
            DeviceKind::Wgpu
        }),
        DeviceKind::Cuda => match cuda_unavailable_reason() {
            None => Ok(DeviceKind::Cuda),
            Some(why) => bail!("--device cuda was asked for, but {why}; use --device wgpu or auto"),
        },
        DeviceKind::Wgpu => Ok(DeviceKind::Wgpu),
    }
}

thread_local! {
    /// Set while this thread runs [`catch_quietly`]: its panic is caught and becomes an error.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic without printing it (cubecl panics when a backend cannot start;
/// that panic becomes an error for the user). The panic hook is wrapped once per process and
/// stays silent only for the thread inside `catch_quietly`: panics elsewhere, such as in tests
/// on parallel threads, still reach the hook that was there before.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(false));
    result
}

fn client_or_error<R: Runtime>(device: &R::Device, what: &str) -> Result<ComputeClient<R>> {
    catch_quietly(|| R::client(device)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        anyhow::anyhow!("could not start the {what} device: {msg}")
    })
}

/// Runs `job` on the device `kind` resolves to.
pub fn dispatch<J: RuntimeJob>(kind: DeviceKind, job: J) -> Result<J::Output> {
    configure_cubecl();
    match resolve(kind)? {
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            let (client, name) = start_cuda()?;
            job.run(client, &name)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => unreachable!("resolve() refuses CUDA without the feature"),
        DeviceKind::Wgpu => {
            use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
            let client = client_or_error::<WgpuRuntime>(&WgpuDevice::DefaultDevice, "wgpu")?;
            let name = format!("wgpu ({})", wgpu_adapter_name());
            job.run(client, &name)
        }
        DeviceKind::Auto => unreachable!("resolve() never returns Auto"),
    }
}

/// The CUDA client, set up as [`dispatch`] sets it up (cubecl configuration, kernel cache, a
/// clear error when CUDA is missing), and the device's name. For code that needs the concrete
/// CUDA runtime, such as the cuBLAS parity test sharing cubecl's device buffers.
#[cfg(feature = "cuda")]
pub fn cuda_client() -> Result<(ComputeClient<cubecl::cuda::CudaRuntime>, String)> {
    configure_cubecl();
    resolve(DeviceKind::Cuda)?;
    start_cuda()
}

#[cfg(feature = "cuda")]
fn start_cuda() -> Result<(ComputeClient<cubecl::cuda::CudaRuntime>, String)> {
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    let client = client_or_error::<CudaRuntime>(&CudaDevice { index: 0 }, "CUDA")?;
    Ok((client, format!("cuda:0 ({})", cuda_device_name())))
}

#[cfg(feature = "cuda")]
fn cuda_device_name() -> String {
    use cudarc::driver::result;
    result::device::get(0)
        .and_then(result::device::get_name)
        .unwrap_or_else(|_| "unknown GPU".into())
}

fn wgpu_adapter_name() -> String {
    std::env::var("CUBECL_WGPU_DEFAULT_DEVICE").unwrap_or_else(|_| "default adapter".into())
}

#[cfg(test)]
mod tests {
    use super::{catch_quietly, kernel_cache_build_dir, kernel_cache_dir};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The quiet hook hides only the panic it catches: another thread's panic at the same time
    /// still reaches the hook that was installed before, and so does every later panic.
    /// (The only test of this binary that touches the panic hook: it installs the first one.)
    #[test]
    fn quiet_start_hides_only_its_own_panic() {
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        std::panic::set_hook(Box::new(|_| {
            SEEN.fetch_add(1, Ordering::SeqCst);
        }));
        for round in 0..2 {
            let before = SEEN.load(Ordering::SeqCst);
            let caught = catch_quietly(|| {
                // A panic on another thread while this one is starting a client.
                let other = std::thread::spawn(|| panic!("another thread's panic"));
                assert!(other.join().is_err());
                panic!("the backend could not start");
            });
            assert!(caught.is_err(), "round {round}: the panic was not caught");
            assert_eq!(
                SEEN.load(Ordering::SeqCst),
                before + 1,
                "round {round}: exactly the other thread's panic must reach the previous hook"
            );
            // A panic after it, outside: reaches the previous hook once.
            assert!(std::panic::catch_unwind(|| panic!("later")).is_err());
            assert_eq!(SEEN.load(Ordering::SeqCst), before + 2, "round {round}");
        }
    }

    /// Each build caches its kernels in a folder of its own under the cache root, named by
    /// the hash `kernels/build.rs` computes (16 hex digits).
    #[test]
    fn the_kernel_cache_is_kept_apart_per_build() {
        let dir = kernel_cache_build_dir();
        assert_eq!(dir.parent(), Some(kernel_cache_dir().as_path()));
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let hash = name.strip_prefix("build-").expect("build-<hash>");
        assert!(
            hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name}"
        );
    }
}

//! The kernels' build identity, for the persistent kernel cache.
//!
//! cubecl keys a cached kernel by its type name and comptime arguments, not by its code, and
//! the graph recorder names its PTX files from the same key. A cache written by another build
//! of these kernels would hand back the other build's kernel whenever a kernel's code changed
//! but its name and arguments did not (a stale kernel, found 2026-11-29 when two builds shared
//! one cache on the GPU machine). So the cache is kept apart per build
//! (`runtime::kernel_cache_build_dir`): this hashes the kernels' sources (library and
//! tests) and the workspace's lock file (cubecl's and cubek's versions) into
//! `CUBEQWEN_KERNELS_BUILD`.
use std::fs;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn main() {
    let mut files = Vec::new();
    for dir in ["src", "tests"] {
        println!("cargo:rerun-if-changed={dir}");
        collect(Path::new(dir), &mut files);
    }
    files.sort();
    let lock = Path::new("../Cargo.lock");
    if lock.exists() {
        println!("cargo:rerun-if-changed=../Cargo.lock");
        files.push(lock.to_path_buf());
    }
    // FNV-1a over each file's path and contents.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in &files {
        let name = f.to_string_lossy().into_owned().into_bytes();
        let body = fs::read(f).unwrap_or_default();
        for b in name.iter().chain(&[0u8]).chain(&body) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=CUBEQWEN_KERNELS_BUILD={h:016x}");
}

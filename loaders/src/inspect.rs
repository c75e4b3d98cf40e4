//! [`inspect`]: a gguf-dump-like text report of a GGUF file (metadata only, no dequantization).

use crate::config::config_from_gguf;
use crate::gguf::GgufFile;
use crate::tokenizer::{summary, tokenizer_from_gguf};
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;

/// Describe a GGUF file: version, architecture, Qwen2 config (or why it cannot be read),
/// tokenizer summary, other metadata, and a table of tensors (name, type, shape, bytes).
pub fn inspect(path: &Path) -> Result<String> {
    let g = GgufFile::open(path)?;
    let mut s = String::new();
    let w = &mut s;
    let file_len = g.bytes().len();
    writeln!(
        w,
        "{}: GGUF v{}, {} bytes, {} metadata keys, {} tensors, alignment {}, data at {}",
        path.display(),
        g.version,
        file_len,
        g.metadata().len(),
        g.tensors().len(),
        g.alignment,
        g.data_offset
    )?;
    let arch = g.get_str("general.architecture").ok().flatten();
    writeln!(w, "architecture: {}", arch.unwrap_or("<none>"))?;
    if let Some(name) = g.get_str("general.name").ok().flatten() {
        writeln!(w, "name: {name}")?;
    }
    match config_from_gguf(&g) {
        Ok(c) => writeln!(
            w,
            "config: hidden {}, layers {}, heads {}, kv heads {}, head_dim {}, ffn {}, vocab {}, rope theta {}, rms eps {:e}, context {}, tied embeddings {}",
            c.hidden, c.layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab,
            c.rope_theta, c.rms_eps, c.context_length, c.tied_embeddings
        )?,
        Err(e) => writeln!(w, "config: unavailable ({e:#})")?,
    }
    match tokenizer_from_gguf(&g) {
        Ok(t) => writeln!(w, "tokenizer: {}", summary(&t))?,
        Err(e) => writeln!(w, "tokenizer: unavailable ({e:#})")?,
    }
    writeln!(w, "metadata:")?;
    for (k, v) in g.metadata() {
        writeln!(w, "  {k:<45} {}", v.summary())?;
    }
    writeln!(w, "tensors:")?;
    writeln!(
        w,
        "  {:<32} {:<7} {:<18} {:>12}",
        "name", "type", "shape", "bytes"
    )?;
    let mut total = 0u64;
    for t in g.tensors() {
        total += t.n_bytes;
        writeln!(
            w,
            "  {:<32} {:<7} {:<18} {:>12}",
            t.name,
            t.ty.name(),
            format!("{:?}", t.shape()),
            t.n_bytes
        )?;
    }
    let mut by_type: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in g.tensors() {
        let e = by_type.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    let types: Vec<String> = by_type
        .iter()
        .map(|(k, (n, b))| format!("{k}: {n} ({b} bytes)"))
        .collect();
    writeln!(
        w,
        "total tensor bytes: {total}; by type: {}",
        types.join(", ")
    )?;
    Ok(s)
}

//! Arbitrary bytes parsed as GGUF: header, metadata, tensor infos and bounds; then, for what
//! parses, every getter, the qwen2 config, the tokenizer, dequantization and the full model load.
//! Any panic, abort, out-of-bounds read or huge allocation is a bug.
#![no_main]

use cubeqwen_loaders::config::config_from_gguf;
use cubeqwen_loaders::quant::dequantize;
use cubeqwen_loaders::tokenizer::tokenizer_from_gguf;
use cubeqwen_loaders::{model_from_gguf, GgufFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes(data) else {
        return;
    };
    for (k, v) in g.metadata() {
        let _ = v.summary();
        let _ = (g.get_u32(k), g.get_u64(k), g.get_f32(k), g.get_bool(k), g.get_str(k));
        let _ = (g.get_array(k), g.get_str_array(k), g.get_i32_array(k));
    }
    let mut total = 0u64;
    for t in g.tensors() {
        let b = g.tensor_bytes(t);
        assert_eq!(b.len() as u64, t.n_bytes, "{}", t.name);
        assert!(t.file_offset + t.n_bytes <= data.len() as u64);
        assert_eq!(t.offset % g.alignment, 0);
        total += t.n_bytes;
        let n = t.n_elements();
        if t.ty.can_dequantize() && n <= 1 << 20 {
            let mut out = vec![0f32; n as usize];
            dequantize(t.ty, b, &mut out).expect("in-bounds tensor of a known type dequantizes");
        }
    }
    assert!(total <= data.len() as u64);
    let _ = tokenizer_from_gguf(&g);
    if let Ok(c) = config_from_gguf(&g) {
        let _ = c.check_tensors("fuzz", |n| g.tensor_info(n).map(|t| t.shape()));
    }
    let _ = model_from_gguf(&g);
});

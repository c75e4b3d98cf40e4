//! Embedding gather (over row chunks), SwiGLU, residual add and fused residual-add + RMSNorm.

use anyhow::ensure;
use cubeqwen_kernels::elementwise::{add_assign, embedding, swiglu, swiglu_reference};
use cubeqwen_kernels::matmul::RowChunked;
use cubeqwen_kernels::rmsnorm::{reference as rms_reference, residual_add_rms_norm};
use cubeqwen_kernels::testing::*;
use cubeqwen_kernels::{device_test, DeviceTensor, KernelError};
use half::f16;

device_test! {
    fn embedding_gathers_exact_rows_across_chunks<R>(client, seed) {
        let mut rng = Rng::new(seed);
        let (vocab, d) = (151936, 896);
        let table = rng.f16_vec(vocab * d, 0.0, 0.05);
        // 7 row chunks, so ids land in different chunks (and the last, shorter one).
        let chunked = RowChunked::<R, f16>::upload_rows(client, &table, vocab, d, 22000)?;
        let ids: Vec<u32> = vec![0, 151935, 151643, 21999, 22000, 785, 785, 100000];
        let idd = DeviceTensor::<R, u32>::from_slice(client, &ids, &[ids.len()])?;
        let out = DeviceTensor::<R, f32>::from_slice(
            client,
            &vec![f32::NAN; ids.len() * d],
            &[ids.len(), d],
        )?;
        embedding(client, &idd, &ids, &chunked, &out)?;
        let got = out.to_vec(client)?;
        for (t, &id) in ids.iter().enumerate() {
            for j in 0..d {
                let want = table[id as usize * d + j].to_f32();
                ensure!(
                    got[t * d + j] == want,
                    "token {t} (id {id}) dim {j}: {} != {want}",
                    got[t * d + j]
                );
            }
        }
        let bad = embedding(client, &idd, &[0, 1, 2, 3, 4, 5, 6, 151936], &chunked, &out);
        ensure!(
            bad.as_ref().err().and_then(|e| e.downcast_ref::<KernelError>())
                == Some(&KernelError::TokenOutsideVocab {
                    id: 151936,
                    vocab: 151936
                }),
            "an id past the vocabulary was not refused as such: {bad:?}"
        );
        println!(
            "embedding: {} ids over {} chunks exact",
            ids.len(),
            chunked.chunks.len()
        );
        Ok(())
    }
}

device_test! {
    fn swiglu_matches_reference<R>(client, seed) {
        let mut rng = Rng::new(seed);
        let (t, ffn) = (7, 4864);
        let g = rng.f16_vec(t * ffn, 0.0, 3.0);
        let u = rng.f16_vec(t * ffn, 0.0, 2.0);
        let gd = DeviceTensor::<R, f16>::from_slice(client, &g, &[t, ffn])?;
        let ud = DeviceTensor::<R, f16>::from_slice(client, &u, &[t, ffn])?;
        let od = DeviceTensor::<R, f16>::from_slice(client, &vec![POISON_F16; t * ffn], &[t, ffn])?;
        swiglu(client, &gd, &ud, &od)?;
        let err = rel_err(
            &f16_to_f64(&od.to_vec(client)?),
            &swiglu_reference(&f16_to_f64(&g), &f16_to_f64(&u)),
        );
        println!("swiglu [{t}x{ffn}]: rel_err={err:.3e}");
        ensure!(err <= 1e-3, "swiglu rel_err {err:.3e}");
        Ok(())
    }
}

device_test! {
    fn residual_add_then_rmsnorm_matches_reference<R>(client, seed) {
        let mut rng = Rng::new(seed);
        let (t, d) = (9, 896);
        // A residual stream with large values, as Qwen2's has (f16 would lose them; it is f32).
        let x = rng.f32_vec(t * d, 0.0, 300.0);
        let r = rng.f16_vec(t * d, 0.0, 1.0);
        let w = rng.f32_vec(d, 1.0, 0.3);
        let xd = DeviceTensor::<R, f32>::from_slice(client, &x, &[t, d])?;
        let rd = DeviceTensor::<R, f16>::from_slice(client, &r, &[t, d])?;
        let wd = DeviceTensor::<R, f32>::from_slice(client, &w, &[d])?;
        let hd = DeviceTensor::<R, f16>::from_slice(client, &vec![POISON_F16; t * d], &[t, d])?;
        residual_add_rms_norm(client, &xd, &rd, &wd, &hd, 1e-6)?;
        let sum: Vec<f64> = x
            .iter()
            .zip(&r)
            .map(|(a, b)| *a as f64 + b.to_f64())
            .collect();
        let x_err = rel_err(&f32_to_f64(&xd.to_vec(client)?), &sum);
        let h_err = rel_err(
            &f16_to_f64(&hd.to_vec(client)?),
            &rms_reference(&sum, &f32_to_f64(&w), d, 1e-6),
        );
        // The plain residual add.
        let xd2 = DeviceTensor::<R, f32>::from_slice(client, &x, &[t, d])?;
        add_assign(client, &xd2, &rd)?;
        let add_err = rel_err(&f32_to_f64(&xd2.to_vec(client)?), &sum);
        println!("residual add + rmsnorm [{t}x{d}]: x rel_err={x_err:.3e} h rel_err={h_err:.3e}; add rel_err={add_err:.3e}");
        ensure!(x_err <= 1e-6, "residual sum rel_err {x_err:.3e}");
        ensure!(add_err <= 1e-6, "residual add rel_err {add_err:.3e}");
        ensure!(h_err <= 1e-3, "normed output rel_err {h_err:.3e}");
        Ok(())
    }
}

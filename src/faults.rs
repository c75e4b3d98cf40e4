//! Known bugs the forward passes can be told to commit, so the tests can prove that the
//! parity tracer finds each one (feature `faults`: test builds only, never the release binary).
//!
//! One set of switches serves the device forward pass ([`crate::forward::Session::faults`])
//! and the f64 reference ([`crate::reference::RefModel::faults`]); the two device-only ones
//! (`kv_write_off_by_one`, `chunk_start_off_by_one`) concern the device's KV cache and prefill
//! chunks, and the reference refuses them. A transposed weight is not a switch: it is applied
//! to the host model before either pass ([`crate::trace::transpose_square_weight`]).

/// All off by default. The comment of each says where the tracer must find it first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// RoPE rotates adjacent pairs `(2i, 2i+1)` instead of NEOX `(i, i + hd/2)`: `L0.q_rope`.
    pub rope_adjacent_pairs: bool,
    /// The q projection without its bias: `L0.q`.
    pub drop_q_bias: bool,
    /// Query head `h` reads kv head `h % n_kv` instead of `h / (n_heads / n_kv)`: `L0.attn`.
    pub wrong_gqa_mapping: bool,
    /// Attention scores scaled by 1/hd instead of 1/sqrt(hd): `L0.attn`.
    pub attention_scale_one_over_hd: bool,
    /// No causal mask within a forward call (every token sees the whole call): `L0.attn`.
    pub no_causal_mask: bool,
    /// Layer `l >= 1` normalises its attention input with layer `l - 1`'s `attn_norm` weight
    /// (a stacked weight read one row off): `L1.attn_norm`.
    pub norm_weight_off_by_one: bool,
    /// The FFN gate and up projections swapped: `L0.gate`.
    pub swap_gate_up: bool,
    /// Layer `N` drops its attention residual (`x = x + attn_out` skipped): `LN.resid1`.
    pub drop_attn_residual: Option<usize>,
    /// Device only: a one-token call (decode) writes its K/V one position too far, so it
    /// attends over a slot never written: `L0.attn` at the first decode position.
    pub kv_write_off_by_one: bool,
    /// Device only: every prefill chunk after the first starts one position early (RoPE
    /// positions and cache slots): `L0.q_rope` at the first position of the second chunk.
    pub chunk_start_off_by_one: bool,
}

impl Faults {
    /// Whether a switch of the attention kernel is on (those run the chunked attention kernel,
    /// which has them, in prefill too).
    pub fn attention_faults(&self) -> bool {
        self.wrong_gqa_mapping || self.attention_scale_one_over_hd || self.no_causal_mask
    }

    /// Whether any device-only switch is on (the reference refuses those).
    pub fn device_only(&self) -> bool {
        self.kv_write_off_by_one || self.chunk_start_off_by_one
    }
}

//! The trace hook: every named intermediate of a forward pass, in execution order.
//!
//! Step names (layer `N` written `LN`, e.g. `L0.q_rope`, `L23.resid2`):
//! `embedding`, then for each layer `LN.attn_norm`, `LN.q`, `LN.k`, `LN.v` (after bias, before
//! RoPE), `LN.q_rope`, `LN.k_rope`, `LN.attn` (attention output before o-proj), `LN.attn_out`
//! (after o-proj), `LN.resid1`, `LN.ffn_norm`, `LN.gate`, `LN.up`, `LN.swiglu`, `LN.down`,
//! `LN.resid2`, and finally `output_norm`, `logits`. See [`step_names`].

/// Receives each step's output. `rows` is the number of tokens of this forward call (row `t`
/// is absolute position `start_pos + t`, announced by [`Tracer::begin`]), `cols` the width of
/// the step; `data` is `[rows][cols]` row-major.
pub trait Tracer {
    /// Called once at the start of each forward call (default: ignored).
    fn begin(&mut self, _start_pos: usize, _tokens: &[u32]) {}
    fn record(&mut self, name: &str, rows: usize, cols: usize, data: &[f64]);
}

/// A tracer that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTrace;

impl Tracer for NoTrace {
    fn record(&mut self, _name: &str, _rows: usize, _cols: usize, _data: &[f64]) {}
}

/// Per-layer step suffixes, in execution order.
pub const LAYER_STEPS: [&str; 15] = [
    "attn_norm",
    "q",
    "k",
    "v",
    "q_rope",
    "k_rope",
    "attn",
    "attn_out",
    "resid1",
    "ffn_norm",
    "gate",
    "up",
    "swiglu",
    "down",
    "resid2",
];

/// All step names of a model with `layers` layers, in execution order.
pub fn step_names(layers: usize) -> Vec<String> {
    let mut v = vec!["embedding".to_string()];
    for l in 0..layers {
        v.extend(LAYER_STEPS.iter().map(|s| format!("L{l}.{s}")));
    }
    v.push("output_norm".into());
    v.push("logits".into());
    v
}

/// One captured row: step `name` at absolute position `pos`.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub name: String,
    pub pos: usize,
    pub data: Vec<f64>,
}

/// A tracer that keeps the rows of selected absolute positions (all positions when
/// `positions` is `None`), in the order they were recorded.
#[derive(Debug, Default, Clone)]
pub struct Capture {
    pub positions: Option<Vec<usize>>,
    pub records: Vec<Record>,
    start_pos: usize,
}

impl Capture {
    /// Captures every position.
    pub fn all() -> Self {
        Self::default()
    }

    /// Captures only the given absolute positions.
    pub fn at(positions: &[usize]) -> Self {
        Self {
            positions: Some(positions.to_vec()),
            ..Self::default()
        }
    }

    /// The captured row of step `name` at position `pos`, if any.
    pub fn get(&self, name: &str, pos: usize) -> Option<&[f64]> {
        self.records
            .iter()
            .find(|r| r.name == name && r.pos == pos)
            .map(|r| r.data.as_slice())
    }
}

impl Tracer for Capture {
    fn begin(&mut self, start_pos: usize, _tokens: &[u32]) {
        self.start_pos = start_pos;
    }

    fn record(&mut self, name: &str, rows: usize, cols: usize, data: &[f64]) {
        for t in 0..rows {
            let pos = self.start_pos + t;
            if self.positions.as_ref().is_none_or(|p| p.contains(&pos)) {
                self.records.push(Record {
                    name: name.to_string(),
                    pos,
                    data: data[t * cols..(t + 1) * cols].to_vec(),
                });
            }
        }
    }
}

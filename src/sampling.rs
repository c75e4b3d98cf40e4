//! Next-token sampling.
//!
//! [`Sampler::sample`] follows llama.cpp's default chain: repetition penalty, top-k, top-p, min-p,
//! temperature, then a draw from a seeded ChaCha8 RNG (same seed and inputs → same tokens).
//! Temperature 0 is greedy: argmax after the repetition penalty, lowest id on ties.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings. A setting at its "off" value disables that step.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy (argmax). Must be finite and >= 0.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sum reaches top_p;
    /// in (0, 1], 1 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below min_p × that of the most likely one;
    /// in [0, 1], 0 = off.
    pub min_p: f32,
    /// Repetition penalty R over recent tokens: positive logits are divided by R, negative ones
    /// multiplied. Must be finite and > 0; 1 = off.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalty looks at; 0 = off.
    pub repeat_last_n: usize,
    /// RNG seed: the same seed with the same logits gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repetition
    /// penalty (1.0, last 64), seed 0.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), no penalty.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed: 0,
        }
    }

    /// Whether sampling is greedy (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether the repetition penalty changes anything.
    pub fn penalizes(&self) -> bool {
        self.repeat_penalty != 1.0 && self.repeat_last_n > 0
    }

    /// The `k` of a device top-k from which [`Sampler::sample_top_k`] draws what
    /// [`Sampler::sample`] would draw from the whole row: sampling (not greedy) with top-k in
    /// `1..=`[`DEVICE_TOP_K_MAX`] and no repetition penalty. `None` where the draw needs every
    /// logit.
    pub fn device_top_k(&self) -> Option<usize> {
        (!self.is_greedy() && (1..=DEVICE_TOP_K_MAX).contains(&self.top_k) && !self.penalizes())
            .then_some(self.top_k)
    }

    /// Checks the ranges documented on each field.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!(
                "temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1] (1 = off), got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("min_p must be in [0, 1] (0 = off), got {}", self.min_p);
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            bail!(
                "repeat_penalty must be a finite number > 0 (1 = off), got {}",
                self.repeat_penalty
            );
        }
        Ok(())
    }
}

/// Index of the largest logit, lowest index on ties; NaN is never chosen (all-NaN gives 0).
pub fn argmax(logits: &[f32]) -> u32 {
    first_max(logits).map_or(0, |(i, _)| i as u32)
}

/// `(index of the largest value, largest, second-largest)`: lowest index on ties (a value equal
/// to the largest at another index is the second), NaN never chosen, second `-inf` for one
/// element. `None` for an empty or all-NaN slice. The one host argmax: sampling, the f64
/// reference and every test use it.
pub fn top2<T: Copy + Into<f64>>(v: &[T]) -> Option<(usize, f64, f64)> {
    let (i, best) = first_max(v)?;
    let second = lane_max(&v[..i]).max(lane_max(&v[i + 1..]));
    Some((i, best, second))
}

/// The largest value and its first index (`None` when empty or all NaN).
fn first_max<T: Copy + Into<f64>>(v: &[T]) -> Option<(usize, f64)> {
    let max = lane_max(v);
    let i = v.iter().position(|&x| x.into() == max)?;
    Some((i, max))
}

/// The largest value (`-inf` when empty or all NaN), in 8 independent lanes so the compiler
/// vectorises it (NaN compares false and is skipped).
fn lane_max<T: Copy + Into<f64>>(v: &[T]) -> f64 {
    let mut lanes = [f64::NEG_INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            let x = c[j].into();
            if x > lanes[j] {
                lanes[j] = x;
            }
        }
    }
    let mut max = f64::NEG_INFINITY;
    for v in lanes
        .into_iter()
        .chain(chunks.remainder().iter().map(|&x| x.into()))
    {
        if v > max {
            max = v;
        }
    }
    max
}

/// Descending by logit, then ascending by id: a total order on finite logits (-0.0 and 0.0
/// equal, as the device top-k compares them), so results are deterministic.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or_else(|| b.1.total_cmp(&a.1))
        .then(a.0.cmp(&b.0))
}

/// A candidate in the top-k heap; the heap's maximum is the worst candidate.
#[derive(Clone, Copy, PartialEq)]
struct Worst((u32, f32));
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        by_logit_desc(&self.0, &other.0)
    }
}

/// The largest top-k drawn from a device top-k ([`SamplingParams::device_top_k`]); its rounds
/// grow with k, so larger ones read the logits instead.
pub const DEVICE_TOP_K_MAX: usize = 128;

/// Number of logit buckets used to find the top-p boundary without sorting everything.
const TOP_P_BUCKETS: usize = 4096;

/// Draws token ids from logits; see the module docs for the order of the steps.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Buffers kept between calls: the penalized logits, the candidates, their weights
    /// (vocabulary-sized, so not reallocated per token).
    logits: Vec<f32>,
    candidates: Vec<(u32, f32)>,
    weights: Vec<f64>,
}

impl Sampler {
    /// A sampler with validated `params`, its RNG seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            logits: Vec::new(),
            candidates: Vec::new(),
            weights: Vec::new(),
        })
    }

    /// The settings it draws with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token id given the logits of the last position (one per vocabulary entry) and
    /// the ids so far (prompt and generated; only the last `repeat_last_n` are penalized).
    ///
    /// Non-finite logits (NaN, ±inf) are never drawn unless nothing else is left, in which case
    /// the argmax is returned.
    ///
    /// # Panics
    /// When `logits` is empty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "Sampler::sample: empty logits");
        let p = self.params.clone();

        // 1. Repetition penalty.
        let penalize = p.penalizes() && !history.is_empty();
        let mut logits_buf = std::mem::take(&mut self.logits);
        let logits: &[f32] = if penalize {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut recent = history[start..].to_vec();
            recent.sort_unstable();
            recent.dedup();
            logits_buf.clear();
            logits_buf.extend_from_slice(logits);
            for &id in &recent {
                if let Some(l) = logits_buf.get_mut(id as usize) {
                    if *l > 0.0 {
                        *l /= p.repeat_penalty;
                    } else {
                        *l *= p.repeat_penalty;
                    }
                }
            }
            &logits_buf
        } else {
            logits
        };
        let id = if p.is_greedy() {
            argmax(logits)
        } else {
            self.sample_filtered(logits, &p)
        };
        self.logits = logits_buf;
        id
    }

    /// [`Sampler::sample`]'s draw from `top`, the best finite logits of the row as (id, value),
    /// value descending then id ascending (a device top-k's order): with
    /// `top.len()` = `top_k` (or every finite logit when fewer) and no repetition penalty
    /// ([`SamplingParams::device_top_k`]), the same token as [`Sampler::sample`] on the whole
    /// row, and the same RNG state after. `None` when `top` holds no finite value (the caller
    /// falls back to [`Sampler::sample`]).
    pub fn sample_top_k(&mut self, top: &[(u32, f32)]) -> Option<u32> {
        let p = self.params.clone();
        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(top.iter().copied().filter(|c| c.1.is_finite()));
        debug_assert!(cands.is_sorted_by(|a, b| by_logit_desc(a, b).is_le()));
        match cands.first() {
            None => None,
            Some(best) if p.is_greedy() => Some(best.0),
            Some(_) => Some(self.draw(&p)),
        }
    }

    fn sample_filtered(&mut self, logits: &[f32], p: &SamplingParams) -> u32 {
        // 2. Top-k (folded into collecting the finite candidates).
        self.collect_candidates(logits, p.top_k);
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        self.draw(p)
    }

    /// Steps 3 to 6 on `candidates` (finite, non-empty).
    fn draw(&mut self, p: &SamplingParams) -> u32 {
        // 3. Top-p (nucleus), on the temperature-1 distribution of the candidates left.
        if p.top_p < 1.0 && self.candidates.len() > 1 {
            self.apply_top_p(p.top_p as f64);
        }
        let cands = &mut self.candidates;
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        // 4. Min-p: p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p).
        if p.min_p > 0.0 && cands.len() > 1 {
            let threshold = max as f64 + (p.min_p as f64).ln();
            cands.retain(|c| c.1 as f64 >= threshold);
        }
        if cands.len() == 1 {
            return cands[0].0;
        }
        // 5. Temperature and 6. the draw.
        // f32 exp per candidate (ample for drawing), summed in f64.
        let inv_t = 1.0 / p.temperature;
        self.weights.clear();
        self.weights
            .extend(cands.iter().map(|c| ((c.1 - max) * inv_t).exp() as f64));
        let total: f64 = self.weights.iter().sum();
        let u: f64 = self.rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        for (c, w) in cands.iter().zip(&self.weights) {
            cum += w;
            if u < cum {
                return c.0;
            }
        }
        // Rounding: u landed at the very end; take the last candidate with weight.
        cands
            .iter()
            .zip(&self.weights)
            .rev()
            .find(|(_, &w)| w > 0.0)
            .map(|(c, _)| c.0)
            .unwrap_or(cands[0].0)
    }

    /// Fills `candidates` with the finite logits, only the `top_k` best when `top_k > 0`; those
    /// in `by_logit_desc` order (the order a device top-k gives, so both draw alike).
    fn collect_candidates(&mut self, logits: &[f32], top_k: usize) {
        let cands = &mut self.candidates;
        cands.clear();
        let finite = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l));
        if top_k == 0 || top_k >= logits.len() {
            cands.extend(finite);
            return;
        }
        let mut heap = std::collections::BinaryHeap::with_capacity(top_k + 1);
        // Logit of the worst kept candidate. Ids only grow during the scan, so a later token
        // that ties with it never beats it: a plain `>` on logits decides.
        let mut worst_logit = f32::NEG_INFINITY;
        for c in finite {
            if heap.len() < top_k {
                heap.push(Worst(c));
                if heap.len() == top_k {
                    worst_logit = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0 .1);
                }
            } else if c.1 > worst_logit {
                if let Some(mut worst) = heap.peek_mut() {
                    *worst = Worst(c);
                }
                worst_logit = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0 .1);
            }
        }
        cands.extend(heap.into_sorted_vec().into_iter().map(|w| w.0));
    }

    /// Keeps the smallest set of best candidates (in `by_logit_desc` order) whose probability
    /// sum reaches `top_p`. Buckets the logits to find the boundary in O(n) and sorts only the
    /// boundary bucket: the same set as sorting everything.
    fn apply_top_p(&mut self, top_p: f64) {
        let cands = &mut self.candidates;
        let (mut max, mut min) = (f32::NEG_INFINITY, f32::INFINITY);
        for c in cands.iter() {
            max = max.max(c.1);
            min = min.min(c.1);
        }
        let scale = if max > min {
            TOP_P_BUCKETS as f32 / (max - min)
        } else {
            0.0
        };
        let bucket = |l: f32| (((max - l) * scale) as usize).min(TOP_P_BUCKETS - 1);
        let weight = |l: f32| (l - max).exp() as f64;
        let mut mass = vec![0.0f64; TOP_P_BUCKETS];
        let mut total = 0.0f64;
        for c in cands.iter() {
            let w = weight(c.1);
            mass[bucket(c.1)] += w;
            total += w;
        }
        let target = top_p * total;
        let mut cum = 0.0f64;
        let mut boundary = None;
        for (b, &m) in mass.iter().enumerate() {
            if cum + m >= target {
                boundary = Some(b);
                break;
            }
            cum += m;
        }
        let Some(b_star) = boundary else {
            return; // rounding: the whole set is needed
        };
        let mut bnd = Vec::new();
        cands.retain(|c| {
            let b = bucket(c.1);
            if b == b_star {
                bnd.push(*c);
            }
            b < b_star
        });
        bnd.sort_unstable_by(by_logit_desc);
        for c in &bnd {
            cands.push(*c);
            cum += weight(c.1);
            if cum >= target {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed,
        }
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / t).exp())
            .collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn frequencies(s: &mut Sampler, logits: &[f32], history: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits, history) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    /// Pseudo-random logits without pulling an RNG into the test's expectations.
    fn test_logits(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let x = (i.wrapping_mul(2654435761) ^ salt.wrapping_mul(40503)) % 10007;
                x as f32 / 1000.0 - 5.0
            })
            .collect()
    }

    #[test]
    fn argmax_lowest_id_on_ties_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, 0.5]), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[-5.0]), 0);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        for salt in 0..20 {
            let l = test_logits(1000, salt);
            assert_eq!(s.sample(&l, &[]), argmax(&l));
        }
        assert_eq!(s.sample(&[0.0, 2.0, 2.0, 1.0], &[]), 1);
        // Filters do not change greedy.
        let mut s = Sampler::new(params(0.0, 5, 0.5, 0.2, 9)).unwrap();
        let l = test_logits(1000, 3);
        assert_eq!(s.sample(&l, &[]), argmax(&l));
    }

    #[test]
    fn temperature_sampling_matches_softmax() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 1.5];
        for t in [1.0f32, 0.7, 2.0] {
            let mut s = Sampler::new(params(t, 0, 1.0, 0.0, 1234)).unwrap();
            let n = 200_000;
            let freq = frequencies(&mut s, &logits, &[], n);
            let want = softmax(&logits, t as f64);
            for (f, w) in freq.iter().zip(&want) {
                // ~4.5 standard deviations of a binomial proportion at n = 200k.
                let tol = 4.5 * (w * (1.0 - w) / n as f64).sqrt() + 1e-4;
                assert!(
                    (f - w).abs() < tol,
                    "t={t}: freq {freq:?} vs softmax {want:?}"
                );
            }
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(1.5, 1, 1.0, 0.0, 7)).unwrap();
        for salt in 0..50 {
            let l = test_logits(5000, salt);
            assert_eq!(s.sample(&l, &[]), argmax(&l));
        }
    }

    #[test]
    fn drawing_from_the_top_k_matches_the_whole_row() {
        use cubeqwen_kernels::select::top_k_reference;
        let settings = [
            SamplingParams::default(),
            params(1.0, 40, 1.0, 0.0, 3),
            params(0.7, 5, 0.5, 0.0, 4),
            params(1.3, 100, 0.9, 0.1, 5),
            params(1.0, 128, 0.98, 0.0, 6),
        ];
        for p in settings {
            let k = p
                .device_top_k()
                .expect("these settings sample from a top-k");
            let (mut whole, mut top) = (Sampler::new(p.clone()).unwrap(), Sampler::new(p).unwrap());
            let mut differ = 0;
            for step in 0..300u32 {
                let mut l = test_logits(5000, step);
                // Ties (quarter steps) and a few non-finite values.
                for x in &mut l[..2500] {
                    *x = (*x * 4.0).round() / 4.0;
                }
                l[(step as usize * 37) % 5000] = f32::NAN;
                l[(step as usize * 91) % 5000] = f32::INFINITY;
                let a = whole.sample(&l, &[]);
                let b = top.sample_top_k(&top_k_reference(&l, k)).unwrap();
                assert_eq!(a, b, "step {step} k {k}");
                differ += usize::from(a != argmax(&l));
            }
            // The settings sample: the draws are not all the argmax.
            assert!(
                differ > 10,
                "k {k}: only {differ} of 300 draws differ from the argmax"
            );
        }
        // Settings that need the whole row.
        for p in [
            SamplingParams::greedy(),
            params(1.0, 0, 0.9, 0.0, 1),
            params(1.0, DEVICE_TOP_K_MAX + 1, 1.0, 0.0, 1),
            SamplingParams {
                repeat_penalty: 1.1,
                ..SamplingParams::default()
            },
        ] {
            assert_eq!(p.device_top_k(), None, "{p:?}");
        }
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample_top_k(&[(3, f32::NAN)]), None);
    }

    #[test]
    fn top_k_restricts_and_renormalizes() {
        let logits = [3.0f32, 2.0, 1.0, 0.0, -1.0];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 0.0, 5)).unwrap();
        let n = 100_000;
        let f = frequencies(&mut s, &logits, &[], n);
        let w = softmax(&logits[..2], 1.0);
        assert_eq!(f[2] + f[3] + f[4], 0.0);
        assert!((f[0] - w[0]).abs() < 0.01, "{f:?} vs {w:?}");
    }

    #[test]
    fn top_p_keeps_smallest_set() {
        // Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625.
        let probs = [0.5f64, 0.25, 0.125, 0.0625, 0.0625];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let n = 50_000;
        // top_p 0.7: {0, 1} (0.75 >= 0.7; {0} alone is 0.5 < 0.7).
        let mut s = Sampler::new(params(1.0, 0, 0.7, 0.0, 11)).unwrap();
        let f = frequencies(&mut s, &logits, &[], n);
        assert_eq!(f[2] + f[3] + f[4], 0.0, "{f:?}");
        assert!(f[1] > 0.3 && f[1] < 0.37, "{f:?}"); // 0.25 / 0.75

        // top_p 0.45: {0} alone suffices.
        let mut s = Sampler::new(params(1.0, 0, 0.45, 0.0, 11)).unwrap();
        let f = frequencies(&mut s, &logits, &[], 1000);
        assert_eq!(f[0], 1.0);
        // top_p 0.8: {0, 1, 2}.
        let mut s = Sampler::new(params(1.0, 0, 0.8, 0.0, 11)).unwrap();
        let f = frequencies(&mut s, &logits, &[], n);
        assert_eq!(f[3] + f[4], 0.0, "{f:?}");
        assert!(f[2] > 0.1, "{f:?}");
    }

    #[test]
    fn top_p_on_a_large_vocabulary() {
        // Flat logits over 1000 tokens: a large kept set, its boundary among ties.
        let mut logits = vec![0.0f32; 1000];
        logits[7] = 1.0;
        let mut s = Sampler::new(params(1.0, 0, 0.9, 0.0, 3)).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5_000 {
            seen.insert(s.sample(&logits, &[]));
        }
        // The kept set is token 7 plus the ~898 lowest ids among the ties (ids ascending).
        assert!(seen.len() > 800 && seen.len() <= 900, "{}", seen.len());
        assert!(seen.iter().all(|&i| i < 900));
    }

    /// Reference: sort everything, keep the prefix whose probability sum reaches p.
    fn top_p_reference(logits: &[f32], p: f64) -> Vec<u32> {
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        c.sort_by(by_logit_desc);
        let max = c[0].1;
        let total: f64 = c.iter().map(|x| ((x.1 - max) as f64).exp()).sum();
        let mut cum = 0.0;
        let mut out = Vec::new();
        for x in c {
            out.push(x.0);
            cum += ((x.1 - max) as f64).exp();
            if cum >= p * total {
                break;
            }
        }
        out.sort_unstable();
        out
    }

    #[test]
    fn fast_top_k_and_top_p_match_sorting() {
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, 1)).unwrap();
        for salt in 0..6 {
            let mut logits = test_logits(20_000, salt);
            if salt % 2 == 1 {
                // Coarse values: many ties.
                logits.iter_mut().for_each(|l| *l = (*l * 2.0).round());
            }
            for k in [1, 7, 100, 19_999] {
                s.collect_candidates(&logits, k);
                let mut got: Vec<u32> = s.candidates.iter().map(|c| c.0).collect();
                got.sort_unstable();
                let mut all: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, l))
                    .collect();
                all.sort_by(by_logit_desc);
                let mut want: Vec<u32> = all[..k].iter().map(|c| c.0).collect();
                want.sort_unstable();
                assert_eq!(got, want, "salt {salt} k {k}");
            }
            for p in [0.01, 0.3, 0.9, 0.999] {
                s.collect_candidates(&logits, 0);
                s.apply_top_p(p);
                let mut got: Vec<u32> = s.candidates.iter().map(|c| c.0).collect();
                got.sort_unstable();
                assert_eq!(got, top_p_reference(&logits, p), "salt {salt} p {p}");
            }
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Probabilities relative to the max: 1, 0.5, 0.09, 0.01.
        let logits: Vec<f32> = [1.0f64, 0.5, 0.09, 0.01]
            .iter()
            .map(|p| p.ln() as f32)
            .collect();
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.1, 2)).unwrap();
        let f = frequencies(&mut s, &logits, &[], 20_000);
        assert_eq!(f[2] + f[3], 0.0, "{f:?}");
        assert!(f[1] > 0.25, "{f:?}");
    }

    #[test]
    fn seeds_reproduce_and_differ() {
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, seed)).unwrap();
            (0..64)
                .map(|i| s.sample(&test_logits(300, i), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn repetition_penalty_lowers_repeated_token() {
        let logits = [2.0f32, 2.0, -1.0, -1.0];
        let mut pen = params(1.0, 0, 1.0, 0.0, 8);
        pen.repeat_penalty = 2.0;
        pen.repeat_last_n = 4;
        let n = 50_000;
        let mut s = Sampler::new(pen.clone()).unwrap();
        let with = frequencies(&mut s, &logits, &[0, 2], n);
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, 8)).unwrap();
        let without = frequencies(&mut s, &logits, &[0, 2], n);
        assert!(with[0] < without[0] - 0.1, "{with:?} vs {without:?}");
        // Negative logits are multiplied: token 2 drops below token 3.
        assert!(with[2] < with[3], "{with:?}");
        // Expected: logits become [1, 2, -2, -1].
        let want = softmax(&[1.0, 2.0, -2.0, -1.0], 1.0);
        for (f, w) in with.iter().zip(&want) {
            assert!((f - w).abs() < 0.01, "{with:?} vs {want:?}");
        }
        // Only the last repeat_last_n tokens count; greedy also sees the penalty.
        let mut g = pen.clone();
        g.temperature = 0.0;
        g.repeat_last_n = 1;
        let mut s = Sampler::new(g).unwrap();
        assert_eq!(s.sample(&logits, &[0]), 1);
        assert_eq!(s.sample(&logits, &[0, 3]), 0);
    }

    #[test]
    fn non_finite_logits_are_not_drawn() {
        let logits = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.0, f32::INFINITY];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, 1)).unwrap();
        for _ in 0..1000 {
            let t = s.sample(&logits, &[]);
            assert!(t == 1 || t == 3, "{t}");
        }
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[]), 0);
    }

    #[test]
    fn validation() {
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        let bad = [
            SamplingParams {
                temperature: -0.1,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.01,
                ..Default::default()
            },
            SamplingParams {
                top_p: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                min_p: -0.1,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: f32::INFINITY,
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
            assert!(Sampler::new(p).is_err());
        }
    }
}

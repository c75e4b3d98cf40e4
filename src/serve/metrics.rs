//! `/metrics` in the Prometheus text format.

use prometheus::{
    Counter, Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use super::engine::Summary;

pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and status.
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    /// Finished jobs by how they ended: eos, length, stop, cancelled, error.
    jobs: IntCounterVec,
    queue_depth: IntGauge,
    running: IntGauge,
    prefill_seconds: Counter,
    decode_seconds: Counter,
    prefill_tps: Gauge,
    decode_tps: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique");
            m
        }
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).unwrap());
        let gauge = |name: &str, help: &str| reg(&registry, Gauge::new(name, help).unwrap());
        Self {
            requests: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("cubeqwen_http_requests_total", "HTTP requests answered"),
                    &["endpoint", "status"],
                )
                .unwrap(),
            ),
            prompt_tokens: counter(
                "cubeqwen_prompt_tokens_total",
                "Prompt tokens of the jobs that started",
            ),
            generated_tokens: counter(
                "cubeqwen_generated_tokens_total",
                "Tokens generated (end-of-sequence ids included)",
            ),
            jobs: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("cubeqwen_jobs_total", "Finished jobs by how they ended"),
                    &["stop_reason"],
                )
                .unwrap(),
            ),
            queue_depth: reg(
                &registry,
                IntGauge::new("cubeqwen_queue_depth", "Jobs waiting for the device").unwrap(),
            ),
            running: reg(
                &registry,
                IntGauge::new("cubeqwen_jobs_running", "Jobs on the device").unwrap(),
            ),
            prefill_seconds: reg(
                &registry,
                Counter::new("cubeqwen_prefill_seconds_total", "Time spent in prefill").unwrap(),
            ),
            decode_seconds: reg(
                &registry,
                Counter::new("cubeqwen_decode_seconds_total", "Time spent decoding").unwrap(),
            ),
            prefill_tps: gauge(
                "cubeqwen_prefill_tokens_per_second",
                "Prefill speed of the last job",
            ),
            decode_tps: gauge(
                "cubeqwen_decode_tokens_per_second",
                "Decode speed of the last job",
            ),
            registry,
        }
        .with_reasons()
    }

    fn with_reasons(self) -> Self {
        for r in Self::REASONS {
            self.jobs.with_label_values(&[r]);
        }
        self
    }

    /// Every stop reason a job can end with (`job_done`'s labels), shown from the start at 0.
    pub const REASONS: [&'static str; 5] = ["eos", "length", "stop", "cancelled", "error"];

    pub fn job_done(&self, reason: &str) {
        self.jobs.with_label_values(&[reason]).inc();
    }

    pub fn record_speed(&self, s: &Summary) {
        self.prefill_seconds.inc_by(s.prefill_time.as_secs_f64());
        self.decode_seconds.inc_by(s.decode_time.as_secs_f64());
        if s.tokens_out > 0 {
            self.prefill_tps.set(s.prefill_tps());
        }
        if s.tokens_out > 1 {
            self.decode_tps.set(s.decode_tps());
        }
    }

    pub fn render(&self, waiting: usize, running: usize) -> prometheus::Result<String> {
        self.queue_depth.set(waiting as i64);
        self.running.set(running as i64);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

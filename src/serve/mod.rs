//! `cubeqwen serve`: the model behind HTTP.
//!
//! - `GET /health`: `{state: "loading"|"ready", model, device, ctx, vram_bytes}`; answers while
//!   the model is still loading.
//! - `POST /execute` and `POST /cancel`: the worker protocol (server-sent events, see
//!   `serve::execute`).
//! - `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`: OpenAI's format
//!   (see `serve::openai`).
//! - `GET /metrics`: Prometheus text format.
//!
//! One thread (the engine, `serve::engine`) owns the device and the model and runs one job at a
//! time from a bounded FIFO queue; HTTP handlers hand it jobs and read their events back
//! through channels. With `--api-key KEY` every route but `/health` wants
//! `Authorization: Bearer KEY`.

mod api;
mod engine;
mod execute;
mod metrics;
mod openai;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::DeviceKind;
use api::ApiError;
use engine::{ModelInfo, Queue};
use metrics::Metrics;

/// How long shutdown waits for open streams to finish after they were given their last event.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// GGUF file or Hugging Face checkpoint directory (default: the cached
    /// Qwen2.5-Coder-0.5B-Instruct, fetched when missing).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Address to listen on (loopback by default; 0.0.0.0 listens on every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// auto (CUDA if a GPU and driver are present, else wgpu), cuda or wgpu.
    #[arg(long, default_value = "auto")]
    pub device: DeviceKind,
    /// KV cache size in tokens (default: 4096, capped by the model's context length).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Jobs that may wait for the device besides the running one; more get 503.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
}

/// What every handler shares.
pub(crate) struct AppState {
    /// The model's name, as `/health` and `/v1/models` give it: the file name without `.gguf`.
    model_name: String,
    api_key: Option<String>,
    max_body_bytes: usize,
    /// Set by the engine once the model is on the device.
    ready: OnceLock<Arc<ModelInfo>>,
    /// Set by the engine when loading failed; the server then stops.
    failed: Mutex<Option<String>>,
    queue: Queue,
    metrics: Metrics,
    /// Wakes the server's shutdown future (engine failure).
    stop: tokio::sync::Notify,
    created_unix: u64,
    /// Numbers the ids of jobs that did not bring one.
    next_id: AtomicU64,
}

impl AppState {
    fn model(&self) -> Result<Arc<ModelInfo>, ApiError> {
        self.ready
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("loading", "the model is still loading"))
    }
}

fn model_name(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}

/// Runs the server until SIGINT or SIGTERM (then exits cleanly) or until the model fails to load
/// (an error).
pub fn run(args: ServeArgs) -> Result<()> {
    if args.queue == 0 {
        bail!("--queue must be at least 1");
    }
    if args.ctx == Some(0) {
        bail!("--ctx must be at least 1");
    }
    if args.api_key.as_deref() == Some("") {
        bail!("--api-key must not be empty");
    }
    let path = match &args.model {
        Some(p) if !p.exists() => bail!("model file {} does not exist", p.display()),
        Some(p) => Some(p.clone()),
        None => None,
    };
    let name = model_name(
        &path
            .clone()
            .unwrap_or_else(|| crate::fetch::cache_dir().join(crate::fetch::MODEL_FILE)),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(args, path, name))
}

async fn serve(args: ServeArgs, path: Option<PathBuf>, model_name: String) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr: SocketAddr = listener.local_addr()?;
    eprintln!("cubeqwen serve: listening on http://{addr}");

    let state = Arc::new(AppState {
        model_name,
        api_key: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        ready: OnceLock::new(),
        failed: Mutex::new(None),
        queue: Queue::new(args.queue),
        metrics: Metrics::new(),
        stop: tokio::sync::Notify::new(),
        created_unix: api::unix_secs(),
        next_id: AtomicU64::new(0),
    });
    let engine = engine::spawn(state.clone(), path, args.device, args.ctx)?;

    let app = router(state.clone());
    let shutdown_state = state.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        wait_for_stop(&shutdown_state).await;
        // Stop taking jobs, end the queued ones and cancel the running one: every open stream
        // gets its last event, so the connections can close.
        shutdown_state.queue.close();
    });
    let mut server = tokio::spawn(async move { server.await });
    let served = tokio::select! {
        r = &mut server => Some(r),
        _ = async {
            // Once shutdown began, give the streams a bounded time to finish.
            while !state.queue.is_closed() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => None,
    };
    match served {
        Some(r) => r.context("the server task")?.context("serving")?,
        None => eprintln!(
            "cubeqwen serve: streams still open {SHUTDOWN_GRACE:?} after shutdown; closing them"
        ),
    }
    state.queue.close();
    tokio::task::spawn_blocking(move || engine.join())
        .await
        .context("joining the engine thread")?
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    if let Some(msg) = state.failed.lock().unwrap().clone() {
        bail!("{msg}");
    }
    eprintln!("cubeqwen serve: stopped");
    Ok(())
}

/// SIGINT, SIGTERM, or the engine giving up.
async fn wait_for_stop(state: &AppState) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => eprintln!("cubeqwen serve: SIGINT, shutting down"),
        _ = term => eprintln!("cubeqwen serve: SIGTERM, shutting down"),
        _ = state.stop.notified() => {}
    }
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/execute", post(execute::execute))
        .route("/cancel", post(execute::cancel))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("path", "no such endpoint")
}

/// Counts every request by route and status.
async fn count(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".to_string());
    let resp = next.run(req).await;
    state
        .metrics
        .requests
        .with_label_values(&[endpoint.as_str(), resp.status().as_str()])
        .inc();
    resp
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given != Some(key.as_str()) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let info = state.ready.get();
    Json(json!({
        "state": if info.is_some() { "ready" } else { "loading" },
        "model": state.model_name,
        "device": info.map(|i| i.device.clone()),
        "ctx": info.map(|i| i.ctx),
        "vram_bytes": info.map(|i| i.vram_bytes),
        "queue_depth": state.queue.depth(),
    }))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let (waiting, running) = state.queue.load();
    match state.metrics.render(waiting, running) {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                prometheus::TEXT_FORMAT.to_string(),
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("encoding the metrics: {e}")).into_response(),
    }
}

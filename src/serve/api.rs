//! Errors as JSON, request bodies parsed with the failing field named, shared field checks.
//!
//! Every error has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, where
//! `param` names the offending field (`"body"` for the body as a whole).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::sampling::SamplingParams;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub param: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            param: param.map(str::to_string),
            message: message.into(),
        }
    }

    /// 400 about `field`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some(field),
            message,
        )
    }

    pub fn not_found(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", Some(field), message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, None, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            Some("authorization"),
            "a valid `Authorization: Bearer KEY` header is required",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            None,
            message,
        )
    }

    pub fn body(&self) -> serde_json::Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
        }
        resp
    }
}

/// The first `` `name` `` in a serde message ("missing field `prompt`").
fn backticked(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(&msg[start..start + len])
}

/// Parses a JSON body into `T`; a body over the limit is 413, invalid JSON 400 on `body`, a
/// wrong type or a missing or unknown field 400 naming that field.
pub fn parse_json<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                Some("body"),
                format!("the request body is larger than the limit of {limit} bytes"),
            )
        } else {
            ApiError::new(r.status(), "bad_body", Some("body"), r.body_text())
        }
    })?;
    let invalid_json = |e: serde_json::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            Some("body"),
            format!("the body is not valid JSON: {e}"),
        )
    };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return invalid_json(inner);
        }
        let msg = inner.to_string();
        // A missing field is named in the message, below the path where it is missing; an
        // unknown one is the path's last step (or only in the message, at the top).
        let named = backticked(&msg).filter(|_| {
            msg.starts_with("missing field") || (path == "." && msg.starts_with("unknown field"))
        });
        let param = match (path.as_str(), named) {
            (".", Some(f)) => f.to_string(),
            (".", None) => "body".to_string(),
            (p, Some(f)) => format!("{p}.{f}"),
            (p, None) => p.to_string(),
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_type",
            Some(&param),
            format!("{param}: {msg}"),
        )
    })?;
    de.end().map_err(invalid_json)?;
    Ok(value)
}

/// A string or a list of strings (OpenAI's `stop`, `prompt`).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Most stop strings a request may give.
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Most tokens one request may ask for.
pub const MAX_TOKENS: u64 = 4096;

/// The sampling fields both protocols share; `None` is the protocol's default.
#[derive(Debug, Default)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
}

/// Checks each field's range, naming the field that is out of it. `default_temperature` and
/// `default_seed` fill in what the request left out; the rest default to off, as in
/// `cubeqwen generate`.
pub fn sampling(
    f: &SamplingFields,
    default_temperature: f64,
    default_seed: u64,
) -> Result<SamplingParams, ApiError> {
    fn range(name: &str, v: f64, ok: bool, want: &str) -> Result<f32, ApiError> {
        if v.is_finite() && ok {
            Ok(v as f32)
        } else {
            Err(ApiError::field(
                name,
                format!("{name} must be {want}, got {v}"),
            ))
        }
    }
    let t = f.temperature.unwrap_or(default_temperature);
    let p = f.top_p.unwrap_or(1.0);
    let m = f.min_p.unwrap_or(0.0);
    let r = f.repetition_penalty.unwrap_or(1.0);
    let params = SamplingParams {
        temperature: range("temperature", t, (0.0..=2.0).contains(&t), "in [0, 2]")?,
        top_p: range("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?,
        min_p: range("min_p", m, (0.0..=1.0).contains(&m), "in [0, 1]")?,
        repeat_penalty: range("repetition_penalty", r, r > 0.0 && r <= 10.0, "in (0, 10]")?,
        top_k: usize::try_from(f.top_k.unwrap_or(0)).unwrap_or(usize::MAX),
        repeat_last_n: SamplingParams::default().repeat_last_n,
        seed: f.seed.unwrap_or(default_seed),
    };
    params
        .validate()
        .map_err(|e| ApiError::field("body", e.to_string()))?;
    Ok(params)
}

/// `max_tokens` in 1..=[`MAX_TOKENS`].
pub fn max_tokens(field: &str, v: u64) -> Result<usize, ApiError> {
    if (1..=MAX_TOKENS).contains(&v) {
        Ok(v as usize)
    } else {
        Err(ApiError::field(
            field,
            format!("{field} must be in 1..={MAX_TOKENS}, got {v}"),
        ))
    }
}

/// At most [`MAX_STOP`] non-empty stop strings of at most [`MAX_STOP_BYTES`] bytes.
pub fn stop_strings(stop: Option<OneOrMany>) -> Result<Vec<String>, ApiError> {
    let stop = stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::field(
            "stop",
            format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
        ));
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_BYTES {
            return Err(ApiError::field(
                &format!("stop[{i}]"),
                format!("stop strings must be 1..={MAX_STOP_BYTES} bytes long"),
            ));
        }
    }
    Ok(stop)
}

pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

//! `cubeqwen serve` end to end: the built binary on 127.0.0.1 (a free port), a small synthetic
//! Qwen2 model (see `serve_common::host_model`), a real HTTP client. Each test starts its own
//! server; the library's `generate` is the reference for the text.

mod common;
mod serve_common;

use std::time::{Duration, Instant};

use cubeqwen::chat::ChatMessage;
use cubeqwen::generate::StopReason;
use serde_json::{json, Value};
use serve_common::*;

/// The context (`--ctx`) of most test servers.
const CTX: usize = 256;
const CTX_ARG: &str = "256";

#[tokio::test]
async fn execute_streams_the_text_of_generate_in_order() {
    let model = model_path();
    let server = Server::start(&model, &["--ctx", CTX_ARG]);
    let c = client();
    let health = server.ready(&c).await;
    assert_eq!(health["model"], "tiny-qwen2");
    assert_eq!(health["ctx"], CTX);
    assert!(health["device"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(health["vram_bytes"].as_u64().unwrap() > 0);

    // (request body, the same settings for the library)
    let mut sampled = params(0.8, 7);
    sampled.top_k = 40;
    sampled.top_p = 0.95;
    sampled.min_p = 0.05;
    let mut penalised = params(0.7, 3);
    penalised.repeat_penalty = 1.3;
    let cases = [
        (
            json!({"job_id": "greedy", "prompt": "Hello world", "max_tokens": 24}),
            LibCase::raw("Hello world", 24, params(0.0, 0)),
        ),
        (
            json!({"job_id": "sampled", "prompt": "Once upon a time", "max_tokens": 24,
                   "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 7}),
            LibCase::raw("Once upon a time", 24, sampled),
        ),
        (
            json!({"job_id": "penalised", "prompt": "abc abc abc", "max_tokens": 20,
                   "temperature": 0.7, "repetition_penalty": 1.3, "seed": 3}),
            LibCase::raw("abc abc abc", 20, penalised),
        ),
    ];
    let lib: Vec<LibCase> = cases.iter().map(|c| c.1.clone()).collect();
    let want = library_generate(&model, CTX, &lib);
    for ((body, _), (_, out)) in cases.iter().zip(&want) {
        let id = body["job_id"].as_str().unwrap();
        let events = execute(&c, &server, body).await;
        let (text, end) = check_events(&events, id);
        println!("{id}: {text:?} ({} tokens)", out.tokens.len());
        assert_eq!(text, out.text, "{id}: text differs from generate's");
        assert_eq!(end["type"], "end");
        assert_eq!(end["stop_reason"], "length", "{id}");
        assert_eq!(out.stop_reason, StopReason::Length);
        assert_eq!(end["tokens_out"], out.tokens.len(), "{id}");
        assert!(end["decode_time_ms"].as_f64().unwrap() > 0.0);
        assert!(
            events.iter().any(|e| e["type"] == "metrics"),
            "no metrics event"
        );
    }

    // A stop string taken from the greedy text: the stream ends before it, as generate does.
    let greedy = &want[0].1.text;
    let chars: Vec<(usize, char)> = greedy.char_indices().collect();
    let k = chars.len() / 2;
    let stop: String = chars[k..k + 2].iter().map(|c| c.1).collect();
    let mut case = lib[0].clone();
    case.stop = vec![stop.clone()];
    let want_stop = &library_generate(&model, CTX, &[case])[0].1;
    assert_eq!(want_stop.stop_reason, StopReason::StopString);
    assert_eq!(want_stop.text, greedy[..greedy.find(&stop).unwrap()]);
    let events = execute(
        &c,
        &server,
        &json!({"job_id": "stop", "prompt": "Hello world", "max_tokens": 24, "stop": [stop]}),
    )
    .await;
    let (text, end) = check_events(&events, "stop");
    assert_eq!(end["stop_reason"], "stop");
    assert_eq!(text, want_stop.text);
    assert_eq!(end["tokens_out"], want_stop.tokens.len());

    // Without a job_id the server names the job.
    let events = execute(&c, &server, &json!({"prompt": "x", "max_tokens": 2})).await;
    let id = events[0]["job_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("job-"), "{id}");
    check_events(&events, &id);
}

#[tokio::test]
async fn a_generated_eos_id_ends_the_stream_with_eos() {
    // Which token the greedy run makes 4th, made the end-of-sequence id of a copy of the model:
    // the same logits, so generation stops at its first occurrence.
    let base = model_path();
    let greedy = &library_generate(&base, CTX, &[LibCase::raw("Hello", 12, params(0.0, 0))])[0].1;
    let eos = greedy.tokens[3];
    let path = eos_model(eos);
    let want = &library_generate(&path, CTX, &[LibCase::raw("Hello", 12, params(0.0, 0))])[0].1;
    assert_eq!(want.stop_reason, StopReason::Eos);
    let n = greedy.tokens.iter().position(|&t| t == eos).unwrap() + 1;
    assert_eq!(want.tokens.len(), n);

    let server = Server::start(&path, &["--ctx", CTX_ARG]);
    let c = client();
    server.ready(&c).await;
    let events = execute(
        &c,
        &server,
        &json!({"job_id": "e", "prompt": "Hello", "max_tokens": 12}),
    )
    .await;
    let (text, end) = check_events(&events, "e");
    assert_eq!(end["stop_reason"], "eos");
    assert_eq!(end["tokens_out"], n);
    assert_eq!(text, want.text);
}

/// A job that would run for minutes if nothing stopped it.
fn long_job(id: &str) -> Value {
    json!({"job_id": id, "prompt": "Tell me everything.", "max_tokens": 4000})
}

/// Reads events up to the first token; returns them.
async fn until_first_token(r: &mut SseReader) -> Vec<Value> {
    let started = r.next_json().await.expect("stream ended");
    assert_eq!(started["type"], "started", "{started}");
    let tok = r.next_json().await.expect("stream ended");
    assert_eq!(tok["type"], "token", "{tok}");
    vec![started, tok]
}

#[tokio::test]
async fn cancel_stops_running_and_queued_jobs() {
    let server = Server::start(&model_path(), &["--ctx", "4096"]);
    let c = client();
    server.ready(&c).await;

    let mut long = SseReader::new(post(&c, &server.url("/execute"), &long_job("long")).await);
    let mut events = until_first_token(&mut long).await;
    // Queued behind it.
    let mut waiting = SseReader::new(post(&c, &server.url("/execute"), &long_job("waiting")).await);
    // A job id in use is refused.
    let dup = post(&c, &server.url("/execute"), &long_job("long")).await;
    assert_eq!(dup.status(), 409);
    let body: Value = dup.json().await.unwrap();
    assert_eq!(body["error"]["param"], "job_id");

    let r = post(&c, &server.url("/cancel"), &json!({"job_id": "waiting"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "queued");
    let w = waiting.rest_json().await;
    assert_eq!(
        w.len(),
        1,
        "a queued job ends with its end event only: {w:?}"
    );
    let (_, end) = check_events(&w, "waiting");
    assert_eq!(end["stop_reason"], "cancelled");
    assert_eq!(end["tokens_out"], 0);

    let t0 = Instant::now();
    let r = post(&c, &server.url("/cancel"), &json!({"job_id": "long"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "running");
    events.extend(long.rest_json().await);
    println!("cancelled in {:.2?}", t0.elapsed());
    let (_, end) = check_events(&events, "long");
    assert_eq!(end["stop_reason"], "cancelled");
    let n = end["tokens_out"].as_u64().unwrap();
    assert!(n < 4000, "{n} tokens");
    // Within one token of the cancel: the tokens that came after it are few.
    let after = events.iter().filter(|e| e["type"] == "token").count() - 1;
    assert!(after <= 50, "{after} tokens after the cancel");

    // Finished and unknown ids.
    for id in ["long", "nope"] {
        let r = post(&c, &server.url("/cancel"), &json!({"job_id": id})).await;
        assert_eq!(r.status(), 404, "{id}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "job_id");
    }
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_place_and_stops_its_job() {
    let server = Server::start(&model_path(), &["--ctx", "4096", "--queue", "1"]);
    let c = client();
    server.ready(&c).await;
    let metrics = || async {
        c.get(server.url("/metrics"))
            .timeout(TIMEOUT)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let wait_for = |name: &'static str, value: f64| {
        let metrics = &metrics;
        async move {
            let t0 = Instant::now();
            loop {
                let m = metrics().await;
                if metric(&m, name) == value {
                    return m;
                }
                assert!(t0.elapsed() < TIMEOUT, "{name} never became {value}:\n{m}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let mut a = SseReader::new(post(&c, &server.url("/execute"), &long_job("a")).await);
    until_first_token(&mut a).await;
    let b = post(&c, &server.url("/execute"), &long_job("b")).await;
    assert_eq!(b.status(), 200);
    wait_for("cubeqwen_queue_depth", 1.0).await;
    // The queue (1 place) is full.
    let full = post(&c, &server.url("/execute"), &long_job("c")).await;
    assert_eq!(full.status(), 503);
    let body: Value = full.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full");

    // b goes away while waiting: its place is free again.
    drop(b);
    let m = wait_for("cubeqwen_queue_depth", 0.0).await;
    // ... at once, not when a is done.
    assert_eq!(metric(&m, "cubeqwen_jobs_running"), 1.0);
    assert_eq!(
        metric(&m, "cubeqwen_jobs_total{stop_reason=\"length\"}"),
        0.0
    );
    assert_eq!(
        metric(&m, "cubeqwen_jobs_total{stop_reason=\"cancelled\"}"),
        1.0
    );
    let mut c2 = SseReader::new(
        post(
            &c,
            &server.url("/execute"),
            &json!({"job_id": "c", "prompt": "short", "max_tokens": 3}),
        )
        .await,
    );

    // a goes away while running: it stops, and c runs to its end.
    drop(a);
    let m = wait_for("cubeqwen_jobs_total{stop_reason=\"cancelled\"}", 2.0).await;
    let generated = metric(&m, "cubeqwen_generated_tokens_total");
    assert!(generated < 4000.0, "{generated}");
    let events = c2.rest_json().await;
    let (_, end) = check_events(&events, "c");
    assert_eq!(end["stop_reason"], "length");
    assert_eq!(end["tokens_out"], 3);
}

#[tokio::test]
async fn eight_concurrent_clients_each_get_their_own_stream() {
    let server = Server::start(&model_path(), &["--ctx", CTX_ARG, "--queue", "8"]);
    let c = client();
    server.ready(&c).await;
    let body = |k: usize| {
        json!({"job_id": format!("client-{k}"), "prompt": format!("client {k} says"),
               "max_tokens": 12 + k, "temperature": if k.is_multiple_of(2) { 0.0 } else { 0.9 },
               "seed": k})
    };
    // Each alone, one after another.
    let mut alone = Vec::new();
    for k in 0..8 {
        alone.push(execute(&c, &server, &body(k)).await);
    }
    // All at once.
    let t0 = Instant::now();
    let together = futures_util::future::join_all((0..8).map(|k| {
        let (c, server, b) = (&c, &server, body(k));
        async move { execute(c, server, &b).await }
    }))
    .await;
    println!("8 concurrent streams in {:.2?}", t0.elapsed());
    // Timings and started_at differ; everything else must be the same.
    let strip = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["type"] != "metrics")
            .map(|e| {
                let mut e = e.clone();
                for k in ["started_at", "decode_time_ms", "prefill_time_ms"] {
                    e.as_object_mut().unwrap().remove(k);
                }
                e
            })
            .collect()
    };
    let mut texts = std::collections::HashSet::new();
    for k in 0..8 {
        let id = format!("client-{k}");
        let (text, end) = check_events(&together[k], &id);
        assert_eq!(end["tokens_out"], 12 + k);
        assert_eq!(strip(&together[k]), strip(&alone[k]), "client {k}");
        texts.insert(text);
    }
    assert_eq!(
        texts.len(),
        8,
        "the 8 texts should differ, so a mix-up would show"
    );
}

#[tokio::test]
async fn bad_requests_get_json_errors_naming_the_field() {
    let server = Server::start(&model_path(), &["--ctx", "64", "--max-body-bytes", "65536"]);
    let c = client();
    server.ready(&c).await;
    // path | body | status | the field the error names
    let table = r#"
        /execute | { | 400 | body
        /execute |  | 400 | body
        /execute | {"prompt": "a"} x | 400 | body
        /execute | [] | 400 | body
        /execute | {} | 400 | prompt
        /execute | {"prompt": 5} | 400 | prompt
        /execute | {"prompt": ""} | 400 | prompt
        /execute | {"prompt": "a", "temprature": 1} | 400 | temprature
        /execute | {"prompt": "a", "max_tokens": 0} | 400 | max_tokens
        /execute | {"prompt": "a", "max_tokens": 4097} | 400 | max_tokens
        /execute | {"prompt": "a", "max_tokens": -1} | 400 | max_tokens
        /execute | {"prompt": "a", "max_tokens": 1.5} | 400 | max_tokens
        /execute | {"prompt": "a", "max_tokens": "9"} | 400 | max_tokens
        /execute | {"prompt": "a", "temperature": 2.5} | 400 | temperature
        /execute | {"prompt": "a", "temperature": -0.1} | 400 | temperature
        /execute | {"prompt": "a", "temperature": "hot"} | 400 | temperature
        /execute | {"prompt": "a", "top_p": 0} | 400 | top_p
        /execute | {"prompt": "a", "top_p": 1.5} | 400 | top_p
        /execute | {"prompt": "a", "top_k": -1} | 400 | top_k
        /execute | {"prompt": "a", "min_p": 2} | 400 | min_p
        /execute | {"prompt": "a", "repetition_penalty": 0} | 400 | repetition_penalty
        /execute | {"prompt": "a", "seed": -1} | 400 | seed
        /execute | {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]} | 400 | stop
        /execute | {"prompt": "a", "stop": [""]} | 400 | stop[0]
        /execute | {"prompt": "a", "stop": 7} | 400 | stop
        /execute | {"prompt": "a", "job_id": ""} | 400 | job_id
        /cancel | {"job_id": 3} | 400 | job_id
        /cancel | {} | 400 | job_id
        /v1/chat/completions | {} | 400 | messages
        /v1/chat/completions | {"messages": []} | 400 | messages
        /v1/chat/completions | {"messages": [{"role": "user", "content": 5}]} | 400 | messages[0].content
        /v1/chat/completions | {"messages": [{"content": "hi"}]} | 400 | messages[0].role
        /v1/chat/completions | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]} | 400 | messages[0].content[0]
        /v1/chat/completions | {"messages": [{"role": "user", "content": "hi"}], "temperature": 3} | 400 | temperature
        /v1/chat/completions | {"messages": [{"role": "user", "content": "hi"}], "n": 2} | 400 | n
        /v1/chat/completions | {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"} | 400 | stream
        /v1/completions | {} | 400 | prompt
        /v1/completions | {"prompt": ["a", "b"]} | 400 | prompt
        /v1/completions | {"prompt": "a", "max_tokens": 0} | 400 | max_tokens
    "#;
    let mut cases: Vec<(String, String, u16, String)> = table
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(" | ").map(str::trim).collect();
            (f[0].into(), f[1].into(), f[2].parse().unwrap(), f[3].into())
        })
        .collect();
    // A prompt longer than the context (64), and a body over --max-body-bytes.
    let long = json!({"prompt": "lorem ipsum dolor ".repeat(40)});
    cases.push(("/execute".into(), long.to_string(), 400, "prompt".into()));
    let huge = json!({"prompt": "x".repeat(100_000)});
    cases.push(("/execute".into(), huge.to_string(), 413, "body".into()));
    for (path, body, status, param) in &cases {
        let r = c
            .post(server.url(path.as_str()))
            .header("content-type", "application/json")
            .body(body.clone())
            .timeout(TIMEOUT)
            .send()
            .await
            .unwrap();
        let what = format!("{path} {:.60}", body);
        assert_eq!(r.status().as_u16(), *status, "{what}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "{what}: {ct}");
        let e: Value = r.json().await.unwrap();
        println!("{what} -> {e}");
        assert_eq!(e["error"]["param"], param.as_str(), "{what}: {e}");
        assert!(e["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let r = c.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"].is_object());

    // Still serving.
    let events = execute(
        &c,
        &server,
        &json!({"job_id": "ok", "prompt": "a", "max_tokens": 2}),
    )
    .await;
    let (_, end) = check_events(&events, "ok");
    assert_eq!(end["tokens_out"], 2);
}

#[tokio::test]
async fn api_key_guards_everything_but_health() {
    let mut server = Server::start(&model_path(), &["--ctx", "64", "--api-key", "sekrit"]);
    let c = client();
    server.ready(&c).await; // /health needs no key
    let body = json!({"job_id": "k", "prompt": "a", "max_tokens": 2});
    for (method, path) in [
        ("POST", "/execute"),
        ("POST", "/cancel"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("sekrit"),
            Some("Basic sekrit"),
        ] {
            let mut rq = match method {
                "GET" => c.get(server.url(path)),
                _ => c.post(server.url(path)).json(&body),
            };
            if let Some(a) = auth {
                rq = rq.header("authorization", a);
            }
            let r = rq.timeout(TIMEOUT).send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["type"], "authentication_error");
        }
    }
    let r = c
        .post(server.url("/execute"))
        .bearer_auth("sekrit")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (_, end) = check_events(&SseReader::new(r).rest_json().await, "k");
    assert_eq!(end["tokens_out"], 2);
    let r = c
        .get(server.url("/v1/models"))
        .bearer_auth("sekrit")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // SIGINT stops it cleanly.
    server.signal("INT");
    assert!(server.wait_exit().success());
}

/// An OpenAI stream's chunks; the last `data:` must be `[DONE]`.
async fn openai_stream(c: &reqwest::Client, url: &str, body: &Value) -> Vec<Value> {
    let mut data = SseReader::new(post(c, url, body).await).rest().await;
    assert_eq!(data.pop().as_deref(), Some("[DONE]"));
    data.iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn openai_chat_and_completions_stream_and_not() {
    let model = model_path();
    let server = Server::start(&model, &["--ctx", CTX_ARG]);
    let c = client();
    server.ready(&c).await;

    let models = get_json(&c, &server.url("/v1/models")).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-qwen2");
    assert_eq!(models["data"][0]["object"], "model");

    let msgs = vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("What is a GPU?"),
    ];
    let lib = library_generate(
        &model,
        CTX,
        &[
            LibCase {
                chat: Some(msgs.clone()),
                ..LibCase::raw("", 12, params(0.7, 11))
            },
            LibCase::raw("Once upon", 10, params(0.0, 0)),
            LibCase::raw("Once upon", 16, params(0.0, 0)),
        ],
    );
    let (chat_ids, chat_out) = &lib[0];
    let (text_ids, text_out) = &lib[1];

    let chat_body = json!({
        "model": "anything",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "What is "},
                                                  {"type": "text", "text": "a GPU?"}]}],
        "max_tokens": 12, "temperature": 0.7, "seed": 11,
    });
    let check_usage = |u: &Value, prompt: usize, out: usize| {
        assert_eq!(u["prompt_tokens"], prompt, "{u}");
        assert_eq!(u["completion_tokens"], out, "{u}");
        assert_eq!(u["total_tokens"], prompt + out, "{u}");
    };

    // Chat, not streamed.
    let r: Value = post(&c, &server.url("/v1/chat/completions"), &chat_body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["object"], "chat.completion");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["model"], "tiny-qwen2");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        r["choices"][0]["message"]["content"],
        chat_out.text.as_str()
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    check_usage(&r["usage"], chat_ids.len(), chat_out.tokens.len());

    // Chat, streamed, with the usage chunk.
    let mut body = chat_body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = openai_stream(&c, &server.url("/v1/chat/completions"), &body).await;
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks
        .iter()
        .all(|ch| ch["id"] == id && ch["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|ch| ch["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, chat_out.text);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "length");
    check_usage(
        &chunks[n - 2]["usage"],
        chat_ids.len(),
        chat_out.tokens.len(),
    );
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    check_usage(
        &chunks[n - 1]["usage"],
        chat_ids.len(),
        chat_out.tokens.len(),
    );
    assert!(chunks[..n - 2]
        .iter()
        .all(|ch| ch["choices"][0]["finish_reason"].is_null()));

    // Completions, not streamed; then streamed.
    let body = json!({"prompt": "Once upon", "max_tokens": 10, "temperature": 0});
    let r: Value = post(&c, &server.url("/v1/completions"), &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["text"], text_out.text.as_str());
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    check_usage(&r["usage"], text_ids.len(), text_out.tokens.len());
    let mut body = body.clone();
    body["stream"] = json!(true);
    let chunks = openai_stream(&c, &server.url("/v1/completions"), &body).await;
    assert!(chunks.iter().all(|ch| ch["object"] == "text_completion"));
    let text: String = chunks
        .iter()
        .filter_map(|ch| ch["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, text_out.text);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    check_usage(&last["usage"], text_ids.len(), text_out.tokens.len());

    // OpenAI's default max_tokens for completions is 16.
    let r: Value = post(
        &c,
        &server.url("/v1/completions"),
        &json!({"prompt": "Once upon", "temperature": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(r["choices"][0]["text"], lib[2].1.text.as_str());
    assert_eq!(r["usage"]["completion_tokens"], 16);
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_jobs() {
    let server = Server::start(&model_path(), &["--ctx", CTX_ARG]);
    let c = client();
    server.ready(&c).await;
    let mut prompt = 0;
    let mut out = 0;
    for (k, n) in [(0, 5), (1, 7)] {
        let id = format!("m{k}");
        let events = execute(
            &c,
            &server,
            &json!({"job_id": id, "prompt": format!("metrics {k}"), "max_tokens": n}),
        )
        .await;
        let (_, end) = check_events(&events, &id);
        prompt += end["prompt_tokens"].as_u64().unwrap();
        out += end["tokens_out"].as_u64().unwrap();
    }
    let bad = post(&c, &server.url("/execute"), &json!({"prompt": ""})).await;
    assert_eq!(bad.status(), 400);
    let r = c.get(server.url("/metrics")).send().await.unwrap();
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let m = r.text().await.unwrap();
    println!("{m}");
    assert_eq!(metric(&m, "cubeqwen_prompt_tokens_total"), prompt as f64);
    assert_eq!(metric(&m, "cubeqwen_generated_tokens_total"), out as f64);
    assert_eq!(out, 12);
    assert_eq!(
        metric(&m, "cubeqwen_jobs_total{stop_reason=\"length\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "cubeqwen_jobs_total{stop_reason=\"cancelled\"}"),
        0.0
    );
    let req = |status: &str| {
        format!("cubeqwen_http_requests_total{{endpoint=\"/execute\",status=\"{status}\"}}")
    };
    assert_eq!(metric(&m, &req("200")), 2.0);
    assert_eq!(metric(&m, &req("400")), 1.0);
    assert_eq!(metric(&m, "cubeqwen_queue_depth"), 0.0);
    assert_eq!(metric(&m, "cubeqwen_jobs_running"), 0.0);
    assert!(metric(&m, "cubeqwen_prefill_tokens_per_second") > 0.0);
    assert!(metric(&m, "cubeqwen_decode_tokens_per_second") > 0.0);
    assert!(metric(&m, "cubeqwen_decode_seconds_total") > 0.0);
    assert!(m.contains("# TYPE cubeqwen_generated_tokens_total counter"));
    assert!(m.contains("# TYPE cubeqwen_queue_depth gauge"));
}

#[tokio::test]
async fn sigterm_ends_running_and_queued_streams_and_exits_zero() {
    let mut server = Server::start(&model_path(), &["--ctx", "4096"]);
    let c = client();
    server.ready(&c).await;
    let mut running = SseReader::new(post(&c, &server.url("/execute"), &long_job("r")).await);
    until_first_token(&mut running).await;
    let mut queued = SseReader::new(post(&c, &server.url("/execute"), &long_job("q")).await);
    let chat = c
        .post(server.url("/v1/chat/completions"))
        .json(
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
                      "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut chat = SseReader::new(chat);
    assert_eq!(
        chat.next_json().await.unwrap()["choices"][0]["delta"]["role"],
        "assistant"
    );

    server.signal("TERM");
    let events = running.rest_json().await;
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{last}");
    assert_eq!(last["code"], "shutting_down");
    let events = queued.rest_json().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "error");
    assert_eq!(events[0]["code"], "shutting_down");
    let rest = chat.rest_json().await;
    assert_eq!(rest.last().unwrap()["error"]["code"], "shutting_down");

    let status = server.wait_exit();
    assert!(
        status.success(),
        "{status:?}\n{}",
        server.log.lock().unwrap()
    );
    assert!(server.log.lock().unwrap().contains("SIGTERM"));
    assert!(c.get(server.url("/health")).send().await.is_err());
}

/// The real model: `/health` says loading first (and jobs get 503 then), then the worker protocol and the chat
/// endpoint give the golden greedy text (one token each: wgpu on a CPU is slow).
#[tokio::test]
async fn real_model_over_http() {
    let path = common::model::model_path();
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(common::model::golden_dir().join("golden.json")).unwrap(),
    )
    .unwrap();
    let case = |name: &str| {
        golden["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    let ids = |v: &Value, n: usize| -> Vec<u32> {
        v.as_array().unwrap()[..n]
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let tokenizer = cubeqwen::tokenizer::Tokenizer::from_data(
        &cubeqwen_loaders::load_tokenizer_data(&path).unwrap(),
    )
    .unwrap();

    let server = Server::start(&path, &["--ctx", "128"]);
    let c = client();
    let first = get_json(&c, &server.url("/health")).await;
    assert_eq!(first["state"], "loading", "{first}");
    assert!(first["device"].is_null());
    let r = post(&c, &server.url("/execute"), &json!({"prompt": "hi"})).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "loading");
    let h = server.ready(&c).await;
    assert_eq!(h["ctx"], 128);
    assert!(h["vram_bytes"].as_u64().unwrap() > 500_000_000, "{h}");

    // One greedy step each, whose golden top-2 margin is large: the text is certain.
    let france = case("france");
    assert!(france["step_margin"][0].as_f64().unwrap() > 0.1);
    let want = tokenizer.decode(&ids(&france["greedy_ids"], 1)).unwrap();
    let resp = post_within(
        &c,
        &server.url("/execute"),
        &json!({"job_id": "france", "prompt": france["prompt"], "max_tokens": 1}),
        REAL_TIMEOUT,
    )
    .await;
    let events = SseReader::with_timeout(resp, REAL_TIMEOUT)
        .rest_json()
        .await;
    let (text, end) = check_events(&events, "france");
    assert_eq!(text, want);
    assert_eq!(
        end["prompt_tokens"],
        france["prompt_ids"].as_array().unwrap().len()
    );

    // The chat endpoint renders the model's own template (with its default system message).
    let haiku = case("haiku_seventeen");
    assert!(haiku["step_margin"][0].as_f64().unwrap() > 0.1);
    let want = tokenizer.decode(&ids(&haiku["greedy_ids"], 1)).unwrap();
    let r: Value = post_within(
        &c,
        &server.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": haiku["prompt"]}],
                "max_tokens": 1, "temperature": 0}),
        REAL_TIMEOUT,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(r["choices"][0]["message"]["content"], want.as_str(), "{r}");
    assert_eq!(
        r["usage"]["prompt_tokens"],
        haiku["prompt_ids"].as_array().unwrap().len()
    );
}

#[test]
fn a_model_that_does_not_load_stops_the_server_with_an_error() {
    // Refused before the port is bound.
    let out = std::process::Command::new(binary())
        .args(["serve", "--port", "0", "--model", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Found but not a model: the port answers first, then the engine fails and the server exits 1.
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-not-a-model.gguf");
    std::fs::write(&path, b"this is not a GGUF file").unwrap();
    let mut server = Server::start(&path, &[]);
    let status = server.wait_exit();
    let log = server.log.lock().unwrap().clone();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("magic"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

//! Chat prompts: renders the model's `tokenizer.chat_template` (Jinja) with minijinja.
//!
//! The environment mimics Hugging Face `apply_chat_template`: `trim_blocks` and `lstrip_blocks`
//! on, Python string/dict methods (minijinja-contrib `pycompat`), `raise_exception(msg)`, and a
//! `tojson` filter that writes like Python's `json.dumps(ensure_ascii=False)`. The context holds
//! `messages` (list of `{role, content}`), `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! For Qwen2.5 the template is ChatML and inserts the system message
//! "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." when the messages have
//! none. Without a template, [`DEFAULT_CHATML_TEMPLATE`] is used: plain ChatML that adds no
//! system message.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use cubeqwen_loaders::TokenizerData;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

/// Fallback template when the model has none: plain ChatML, no implicit system message.
/// `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then `<|im_start|>assistant\n`
/// when a generation prompt is asked for.
pub const DEFAULT_CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// "system", "user", "assistant" (or "tool").
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    fn to_value(&self) -> Value {
        let mut m = BTreeMap::new();
        m.insert("role".to_string(), Value::from(self.role.as_str()));
        m.insert("content".to_string(), Value::from(self.content.as_str()));
        Value::from(m)
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    fallback: bool,
}

impl ChatTemplate {
    /// Compiles `template` (or [`DEFAULT_CHATML_TEMPLATE`] when `None`); `bos_token` and
    /// `eos_token` are the texts the template may refer to.
    pub fn new(
        template: Option<&str>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let fallback = template.is_none();
        let source = template.unwrap_or(DEFAULT_CHATML_TEMPLATE).to_string();
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("chat template syntax config: {e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| anyhow!("chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            fallback,
        })
    }

    /// The template of `data.chat_template` (fallback ChatML when absent), with the BOS/EOS
    /// token texts from the vocabulary.
    pub fn from_data(data: &TokenizerData) -> Result<Self> {
        let name = |id: Option<u32>| {
            id.and_then(|i| data.tokens.get(i as usize))
                .cloned()
                .unwrap_or_default()
        };
        Self::new(
            data.chat_template.as_deref(),
            name(data.bos_id),
            name(data.eos_id),
        )
    }

    /// Whether this is the built-in fallback template.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with the opening of the
    /// assistant's turn (`<|im_start|>assistant\n` for ChatML).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template: {e:#}"))?;
        let messages: Vec<Value> = messages.iter().map(ChatMessage::to_value).collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        tmpl.render(ctx)
            .map_err(|e| anyhow!("rendering the chat template failed: {e:#}"))
    }
}

/// Renders `messages` with the template in `data` and a generation prompt: the text to encode
/// for the model to answer.
pub fn render_chat(data: &TokenizerData, messages: &[ChatMessage]) -> Result<String> {
    ChatTemplate::from_data(data)?.render(messages, true)
}

/// Renders a single user prompt (the template adds its default system message, if any).
pub fn render_user_prompt(data: &TokenizerData, prompt: &str) -> Result<String> {
    render_chat(data, &[ChatMessage::user(prompt)])
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("chat template raised: {msg}"),
    ))
}

/// `tojson` like HF's: `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; keys are written in the map's order either way.
    let _: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
                return Ok(());
            }
            let f = f64::try_from(v.clone())?;
            if !f.is_finite() {
                out.push_str(if f.is_nan() {
                    "NaN"
                } else if f > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                });
            } else if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&format!("{f}"));
            }
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            let mut first = true;
            for item in v.try_iter()? {
                if !first {
                    out.push_str(item_sep);
                }
                first = false;
                newline(out, depth + 1);
                write_json(out, &item, indent, depth + 1)?;
            }
            if !first {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            let mut first = true;
            for key in v.try_iter()? {
                if !first {
                    out.push_str(item_sep);
                }
                first = false;
                newline(out, depth + 1);
                match key.as_str() {
                    Some(k) => write_json_str(out, k),
                    None => write_json_str(out, &key.to_string()),
                }
                out.push_str(": ");
                write_json(out, &v.get_item(&key)?, indent, depth + 1)?;
            }
            if !first {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Qwen2.5 template's non-tool part, verbatim.
    const QWEN25_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {{- tool_call.name }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    const SYS: &str = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n";

    fn qwen() -> ChatTemplate {
        ChatTemplate::new(Some(QWEN25_TEMPLATE), "<|endoftext|>", "<|im_end|>").unwrap()
    }

    #[test]
    fn qwen_default_system_prompt() {
        let out = qwen().render(&[ChatMessage::user("Hi")], true).unwrap();
        assert_eq!(
            out,
            format!("{SYS}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        );
        let out = qwen().render(&[ChatMessage::user("Hi")], false).unwrap();
        assert_eq!(out, format!("{SYS}<|im_start|>user\nHi<|im_end|>\n"));
    }

    #[test]
    fn qwen_explicit_system_and_history() {
        let msgs = [
            ChatMessage::system("Be terse."),
            ChatMessage::user("1+1?"),
            ChatMessage::assistant("2"),
            ChatMessage::user("And 2+2?"),
        ];
        let out = qwen().render(&msgs, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe terse.<|im_end|>\n\
             <|im_start|>user\n1+1?<|im_end|>\n\
             <|im_start|>assistant\n2<|im_end|>\n\
             <|im_start|>user\nAnd 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn fallback_is_plain_chatml() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        assert!(t.is_fallback());
        let out = t
            .render(
                &[ChatMessage::system("S"), ChatMessage::user("U\nline")],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU\nline<|im_end|>\n<|im_start|>assistant\n"
        );
        let data = TokenizerData::default();
        assert_eq!(
            render_user_prompt(&data, "x").unwrap(),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            Some("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"),
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[ChatMessage::user("a")], true).unwrap(), "ok");
        let e = t
            .render(&[ChatMessage::assistant("a")], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("first must be user"), "{e}");
    }

    #[test]
    fn python_methods_and_tokens() {
        let t = ChatTemplate::new(
            Some("{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}|{{ m['role'].startswith('us') }}{% endfor %}{{ eos_token }}"),
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("  hi  ")], true).unwrap(),
            "<s>HI|True</s>"
        );
    }

    #[test]
    fn tojson_like_python() {
        let t = ChatTemplate::new(
            Some("{{ messages[0] | tojson }} {{ [1, 2.5, 3.0, none, true, 'é\"<'] | tojson }}"),
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("a\nb")], false).unwrap(),
            r#"{"content": "a\nb", "role": "user"} [1, 2.5, 3.0, null, true, "é\"<"]"#
        );
        let t = ChatTemplate::new(Some("{{ [1, [2]] | tojson(indent=2) }}"), "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "[\n  1,\n  [\n    2\n  ]\n]");
    }

    #[test]
    fn bad_template_is_an_error() {
        assert!(ChatTemplate::new(Some("{% for %}"), "", "").is_err());
    }
}

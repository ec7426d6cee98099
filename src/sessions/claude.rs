//! One line of a Claude Code session file → the text it contributes.
//!
//! Lines with `type` `user` or `assistant` carry `message.content`: a string, or an array of
//! blocks (`text`, `thinking`, `tool_use` with `name` and `input`, `tool_result` whose `content`
//! is a string or more blocks). Every other `type` (`summary`, `system`, `file-history-snapshot`,
//! `queue-operation`, …) is skipped by type.

use serde_json::Value;

use super::message::{push_block, tool_output_text, Parsed, Reason};

pub fn parse_line(line: &str) -> Parsed {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => return Parsed::Skip(Reason::Malformed),
    };
    let Some(kind) = v.get("type").and_then(Value::as_str) else {
        return Parsed::Skip(Reason::Malformed);
    };
    let role = match kind {
        "user" => "user",
        "assistant" => "assistant",
        _ => return Parsed::Skip(Reason::ByType),
    };
    let content = match v.get("message") {
        Some(Value::Object(m)) => m.get("content").unwrap_or(&Value::Null),
        Some(Value::Null) | None => &Value::Null,
        Some(_) => return Parsed::Skip(Reason::Malformed),
    };
    let mut out = String::new();
    match content {
        Value::String(s) => push_block(&mut out, role, s),
        Value::Array(blocks) => {
            for b in blocks {
                push_content_block(&mut out, role, b);
            }
        }
        Value::Null => {}
        _ => return Parsed::Skip(Reason::Malformed),
    }
    if out.is_empty() {
        Parsed::Skip(Reason::NoText)
    } else {
        Parsed::Message(out)
    }
}

fn push_content_block(out: &mut String, role: &str, b: &Value) {
    let text_of = |key: &str| b.get(key).and_then(Value::as_str).unwrap_or("");
    match b.get("type").and_then(Value::as_str) {
        Some("text") => push_block(out, role, text_of("text")),
        Some("thinking") => push_block(out, "thinking", text_of("thinking")),
        Some("tool_use") | Some("server_tool_use") => {
            let name = b.get("name").and_then(Value::as_str).unwrap_or("tool");
            let input = b.get("input").map(Value::to_string).unwrap_or_default();
            push_block(out, &format!("tool_call {name}"), &input);
        }
        Some("tool_result") => {
            let marker = if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                "tool_result error"
            } else {
                "tool_result"
            };
            let text = b.get("content").map(tool_output_text).unwrap_or_default();
            push_block(out, marker, &text);
        }
        // Images, documents, redacted thinking and unknown blocks carry no text to replay.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(line: &str) -> String {
        match parse_line(line) {
            Parsed::Message(m) => m,
            Parsed::Skip(r) => panic!("skipped {r:?}: {line}"),
        }
    }

    #[test]
    fn string_and_block_content() {
        assert_eq!(
            msg(r#"{"type":"user","message":{"role":"user","content":"fix the test"}}"#),
            "[user]\nfix the test\n"
        );
        let line = r#"{"type":"assistant","message":{"content":[
            {"type":"thinking","thinking":"look first","signature":"x"},
            {"type":"text","text":"Reading it."},
            {"type":"tool_use","id":"t1","name":"Read","input":{"file_path":"src/a.rs"}},
            {"type":"image","source":{}}]}}"#
            .replace('\n', "");
        assert_eq!(
            msg(&line),
            "[thinking]\nlook first\n[assistant]\nReading it.\n[tool_call Read]\n{\"file_path\":\"src/a.rs\"}\n"
        );
    }

    #[test]
    fn tool_results_with_string_or_block_content() {
        let a = r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","content":"1 fn main() {}"}]}}"#;
        assert_eq!(msg(a), "[tool_result]\n1 fn main() {}\n");
        let b = r#"{"type":"user","message":{"content":[{"type":"tool_result","is_error":true,"content":[{"type":"text","text":"exit 1"},{"type":"image"}]}]}}"#;
        assert_eq!(msg(b), "[tool_result error]\nexit 1\n");
    }

    #[test]
    fn skip_reasons() {
        let cases = [
            ("not json", Reason::Malformed),
            ("[1,2]", Reason::Malformed),
            (r#"{"message":{"content":"x"}}"#, Reason::Malformed),
            (r#"{"type":"user","message":"x"}"#, Reason::Malformed),
            (
                r#"{"type":"user","message":{"content":5}}"#,
                Reason::Malformed,
            ),
            (
                r#"{"type":"summary","summary":"s","leafUuid":"u"}"#,
                Reason::ByType,
            ),
            (
                r#"{"type":"file-history-snapshot","snapshot":{}}"#,
                Reason::ByType,
            ),
            (r#"{"type":"system","content":"hook ran"}"#, Reason::ByType),
            (
                r#"{"type":"assistant","message":{"content":null}}"#,
                Reason::NoText,
            ),
            (
                r#"{"type":"assistant","message":{"content":[]}}"#,
                Reason::NoText,
            ),
            (
                r#"{"type":"user","message":{"content":"  "}}"#,
                Reason::NoText,
            ),
        ];
        for (line, want) in cases {
            match parse_line(line) {
                Parsed::Skip(r) => assert_eq!(r, want, "{line}"),
                Parsed::Message(m) => panic!("kept {m:?} from {line}"),
            }
        }
    }
}

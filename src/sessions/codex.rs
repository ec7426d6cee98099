//! One line of a Codex rollout file → the text it contributes.
//!
//! Lines are `{"timestamp", "type", "payload"}`. Only `response_item` lines carry conversation:
//! a `message` payload with role `user` or `assistant` (content blocks `input_text` /
//! `output_text`), and tool traffic (`function_call` with `name` and `arguments`,
//! `function_call_output` with `output`, and their `custom_tool_call` twins). Messages with role
//! `developer` or `system`, and user messages that only inject `<user_instructions>`, are
//! instructions and skipped as such. `session_meta`, `turn_context`, `event_msg` (which repeats
//! the messages), `reasoning` and other types are skipped by type.

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
    if kind != "response_item" {
        return Parsed::Skip(Reason::ByType);
    }
    let Some(payload) = v.get("payload").filter(|p| p.is_object()) else {
        return Parsed::Skip(Reason::Malformed);
    };
    let str_of = |key: &str| payload.get(key).and_then(Value::as_str).unwrap_or("");
    let mut out = String::new();
    match payload.get("type").and_then(Value::as_str) {
        Some("message") => {
            let role = match str_of("role") {
                "user" => "user",
                "assistant" => "assistant",
                "developer" | "system" => return Parsed::Skip(Reason::Instructions),
                _ => return Parsed::Skip(Reason::ByType),
            };
            match payload.get("content") {
                Some(Value::String(s)) => push_block(&mut out, role, s),
                Some(Value::Array(blocks)) => {
                    for b in blocks {
                        let text = match b.get("type").and_then(Value::as_str) {
                            Some("input_text") | Some("output_text") | Some("text") => {
                                b.get("text").and_then(Value::as_str).unwrap_or("")
                            }
                            _ => "",
                        };
                        if role == "user" && text.trim_start().starts_with("<user_instructions>") {
                            continue;
                        }
                        push_block(&mut out, role, text);
                    }
                    if out.is_empty() && is_instructions_only(blocks) {
                        return Parsed::Skip(Reason::Instructions);
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => return Parsed::Skip(Reason::Malformed),
            }
        }
        Some("function_call") => {
            let name = payload
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("tool");
            push_block(&mut out, &format!("tool_call {name}"), str_of("arguments"));
        }
        Some("custom_tool_call") => {
            let name = payload
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("tool");
            push_block(&mut out, &format!("tool_call {name}"), str_of("input"));
        }
        Some("function_call_output") | Some("custom_tool_call_output") => {
            let text = payload
                .get("output")
                .map(tool_output_text)
                .unwrap_or_default();
            push_block(&mut out, "tool_result", &text);
        }
        Some(_) => return Parsed::Skip(Reason::ByType),
        None => return Parsed::Skip(Reason::Malformed),
    }
    if out.is_empty() {
        Parsed::Skip(Reason::NoText)
    } else {
        Parsed::Message(out)
    }
}

fn is_instructions_only(blocks: &[Value]) -> bool {
    blocks.iter().any(|b| {
        b.get("text")
            .and_then(Value::as_str)
            .is_some_and(|t| t.trim_start().starts_with("<user_instructions>"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<String, Reason> {
        match parse_line(line) {
            Parsed::Message(m) => Ok(m),
            Parsed::Skip(r) => Err(r),
        }
    }

    #[test]
    fn messages_and_tool_traffic() {
        let user = r#"{"timestamp":"t","type":"response_item","payload":{"type":"message","role":"user","content":[{"type":"input_text","text":"run the tests"}]}}"#;
        assert_eq!(parse(user), Ok("[user]\nrun the tests\n".into()));
        let asst = r#"{"type":"response_item","payload":{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Done."}]}}"#;
        assert_eq!(parse(asst), Ok("[assistant]\nDone.\n".into()));
        let call = r#"{"type":"response_item","payload":{"type":"function_call","name":"shell","arguments":"{\"command\":[\"ls\"]}","call_id":"c1"}}"#;
        assert_eq!(
            parse(call),
            Ok("[tool_call shell]\n{\"command\":[\"ls\"]}\n".into())
        );
        let out = r#"{"type":"response_item","payload":{"type":"function_call_output","call_id":"c1","output":"Cargo.toml\nsrc"}}"#;
        assert_eq!(parse(out), Ok("[tool_result]\nCargo.toml\nsrc\n".into()));
        let out_obj = r#"{"type":"response_item","payload":{"type":"function_call_output","call_id":"c1","output":{"content":"ok","success":true}}}"#;
        assert_eq!(parse(out_obj), Ok("[tool_result]\nok\n".into()));
    }

    #[test]
    fn skip_reasons() {
        let cases = [
            ("{", Reason::Malformed),
            (r#"{"payload":{}}"#, Reason::Malformed),
            (r#"{"type":"response_item"}"#, Reason::Malformed),
            (
                r#"{"type":"response_item","payload":{"role":"user"}}"#,
                Reason::Malformed,
            ),
            (
                r#"{"type":"session_meta","payload":{"id":"x"}}"#,
                Reason::ByType,
            ),
            (
                r#"{"type":"event_msg","payload":{"type":"user_message","message":"hi"}}"#,
                Reason::ByType,
            ),
            (
                r#"{"type":"response_item","payload":{"type":"reasoning","summary":[]}}"#,
                Reason::ByType,
            ),
            (
                r#"{"type":"response_item","payload":{"type":"message","role":"developer","content":[{"type":"input_text","text":"rules"}]}}"#,
                Reason::Instructions,
            ),
            (
                r#"{"type":"response_item","payload":{"type":"message","role":"user","content":[{"type":"input_text","text":"<user_instructions>be brief</user_instructions>"}]}}"#,
                Reason::Instructions,
            ),
            (
                r#"{"type":"response_item","payload":{"type":"message","role":"assistant","content":[]}}"#,
                Reason::NoText,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Err(want), "{line}");
        }
    }
}

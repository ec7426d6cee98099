//! The text trace formats: JSONL (one step per line) and CSV (`layer_id,expert_ids`).
//!
//! Owns parsing and printing those two layouts. Geometry they do not state is inferred from the
//! data (layers = longest step, experts = largest id + 1, k = most ids at one layer). It never
//! skips a malformed line: every parse error names the file and the line.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use serde::Deserialize;
use spark_proto::trace::MAX_K;

use super::{check_ids, Routing, Trace, TraceError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonStep {
    #[serde(default)]
    tok: u32,
    #[serde(default)]
    request: u32,
    #[serde(default)]
    phase: Option<String>,
    layers: Vec<Vec<u32>>,
    #[serde(default)]
    weights: Option<Vec<Vec<f32>>>,
}

/// One parsed step before the geometry is known.
struct RawStep {
    prompt: bool,
    request: u32,
    token: u32,
    layers: Vec<Vec<u16>>,
    weights: Vec<Vec<f32>>,
}

fn read_text(path: &Path) -> Result<String, TraceError> {
    fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn to_ids(raw: &[u32]) -> Result<Vec<u16>, String> {
    if raw.len() > MAX_K {
        return Err(format!(
            "{} experts at one layer (at most {MAX_K})",
            raw.len()
        ));
    }
    raw.iter()
        .map(|&e| u16::try_from(e).map_err(|_| format!("expert id {e} out of range")))
        .collect()
}

/// Reads the JSONL format: `{"tok": n, "layers": [[ids…], …]}` per line; optional fields
/// `"request"`, `"phase"` (`"prompt"` or `"decode"`, default decode) and `"weights"`.
pub fn read_jsonl(path: &Path) -> Result<Trace, TraceError> {
    let text = read_text(path)?;
    let mut steps = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let perr = |msg: String| TraceError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            msg,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let js: JsonStep = serde_json::from_str(line).map_err(|e| perr(e.to_string()))?;
        let prompt = match js.phase.as_deref() {
            None | Some("decode") => false,
            Some("prompt") => true,
            Some(other) => {
                return Err(perr(format!(
                    "unknown phase {:?}",
                    crate::text::clip(other, crate::text::QUOTE_MAX)
                )))
            }
        };
        if js.layers.len() > usize::from(u16::MAX) {
            return Err(perr(format!("{} layers", js.layers.len())));
        }
        let layers = js
            .layers
            .iter()
            .map(|l| to_ids(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(perr)?;
        let weights = js.weights.unwrap_or_default();
        if !weights.is_empty()
            && (weights.len() != layers.len()
                || weights.iter().zip(&layers).any(|(w, l)| w.len() != l.len()))
        {
            return Err(perr("weights do not match layers".into()));
        }
        for l in &layers {
            check_ids(l, u32::from(u16::MAX) + 1).map_err(perr)?;
        }
        steps.push(RawStep {
            prompt,
            request: js.request,
            token: js.tok,
            layers,
            weights,
        });
    }
    build(path, steps, false)
}

/// Reads the CSV format: rows `layer_id,expert_ids` with ids separated by spaces; an optional
/// header row, `#` comments and blank lines are skipped. A row whose layer is not greater than
/// the previous row's starts the next token.
pub fn read_csv(path: &Path) -> Result<Trace, TraceError> {
    let text = read_text(path)?;
    let mut steps: Vec<RawStep> = Vec::new();
    let mut prev_layer: Option<usize> = None;
    let mut seen_data = false;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let perr = |msg: String| TraceError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            msg,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (layer_s, ids_s) = line
            .split_once(',')
            .ok_or_else(|| perr("expected layer_id,expert_ids".into()))?;
        let layer_s = layer_s.trim();
        let layer: usize = match layer_s.parse() {
            Ok(l) => l,
            Err(_) if !seen_data && !layer_s.starts_with(|c: char| c.is_ascii_digit()) => {
                // The header row.
                seen_data = true;
                continue;
            }
            Err(_) => {
                return Err(perr(format!(
                    "bad layer id {:?}",
                    crate::text::clip(layer_s, crate::text::QUOTE_MAX)
                )))
            }
        };
        seen_data = true;
        if layer >= usize::from(u16::MAX) {
            return Err(perr(format!("layer id {layer} out of range")));
        }
        let raw = ids_s
            .trim()
            .trim_matches('"')
            .split_whitespace()
            .map(|t| {
                t.parse::<u32>().map_err(|_| {
                    perr(format!(
                        "bad expert id {:?}",
                        crate::text::clip(t, crate::text::QUOTE_MAX)
                    ))
                })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let ids = to_ids(&raw).map_err(perr)?;
        check_ids(&ids, u32::from(u16::MAX) + 1).map_err(perr)?;
        if prev_layer.map_or(true, |p| layer <= p) {
            steps.push(RawStep {
                prompt: false,
                request: 0,
                token: steps.len() as u32,
                layers: Vec::new(),
                weights: Vec::new(),
            });
        }
        prev_layer = Some(layer);
        let step = steps.last_mut().expect("a step was just pushed");
        if step.layers.len() <= layer {
            step.layers.resize(layer + 1, Vec::new());
        }
        step.layers[layer] = ids;
    }
    build(path, steps, false)
}

fn build(path: &Path, steps: Vec<RawStep>, ids_sorted_hint: bool) -> Result<Trace, TraceError> {
    let n_layer = steps.iter().map(|s| s.layers.len()).max().unwrap_or(0);
    if n_layer == 0 {
        return Err(TraceError::Invalid {
            path: path.to_path_buf(),
            msg: "no routing in the file".into(),
        });
    }
    let all = || steps.iter().flat_map(|s| s.layers.iter());
    let n_expert = all()
        .flatten()
        .map(|&e| u32::from(e) + 1)
        .max()
        .unwrap_or(1);
    let k = all().map(|l| l.len() as u32).max().unwrap_or(1).max(1);
    let ids_sorted = ids_sorted_hint || all().all(|l| l.windows(2).all(|w| w[0] < w[1]));
    let has_weights = steps.iter().any(|s| !s.weights.is_empty());
    let mut decode = Routing::new(n_layer);
    let mut prompt = Routing::new(n_layer);
    let empty: &[f32] = &[];
    for s in &steps {
        let target = if s.prompt { &mut prompt } else { &mut decode };
        target.push_step(
            s.request,
            s.token,
            s.layers.iter().enumerate().map(|(l, ids)| {
                (
                    ids.as_slice(),
                    s.weights.get(l).map(Vec::as_slice).unwrap_or(empty),
                )
            }),
        );
    }
    Ok(Trace {
        n_layer: n_layer as u32,
        n_expert,
        k,
        fingerprint: None,
        ids_sorted,
        has_weights,
        decode,
        prompt,
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), TraceError> {
    crate::atomic_file::write_atomic(path, text.as_bytes()).map_err(|source| TraceError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn push_list<T: std::fmt::Display>(out: &mut String, items: &[T]) {
    out.push('[');
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{x}");
    }
    out.push(']');
}

/// Writes the JSONL format (prompt steps first, marked `"phase": "prompt"`), atomically.
pub fn write_jsonl(trace: &Trace, path: &Path) -> Result<(), TraceError> {
    let mut out = String::new();
    for (routing, phase) in [(&trace.prompt, Some("prompt")), (&trace.decode, None)] {
        for s in 0..routing.steps() {
            let (req, tok) = routing.token(s);
            let _ = write!(out, "{{\"tok\": {tok}");
            if req != 0 {
                let _ = write!(out, ", \"request\": {req}");
            }
            if let Some(p) = phase {
                let _ = write!(out, ", \"phase\": \"{p}\"");
            }
            out.push_str(", \"layers\": [");
            for l in 0..routing.n_layer() {
                if l > 0 {
                    out.push_str(", ");
                }
                push_list(&mut out, routing.ids(s, l));
            }
            out.push(']');
            if trace.has_weights {
                out.push_str(", \"weights\": [");
                for l in 0..routing.n_layer() {
                    if l > 0 {
                        out.push_str(", ");
                    }
                    push_list(&mut out, routing.weights(s, l));
                }
                out.push(']');
            }
            out.push_str("}\n");
        }
    }
    write_text(path, &out)
}

/// Writes the CSV format, atomically. CSV has no phase column, so it holds decode steps only.
pub fn write_csv(trace: &Trace, path: &Path) -> Result<(), TraceError> {
    let mut out = String::from("layer_id,expert_ids\n");
    let r = &trace.decode;
    for s in 0..r.steps() {
        for l in 0..r.n_layer() {
            let _ = write!(out, "{l},");
            for (i, e) in r.ids(s, l).iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                let _ = write!(out, "{e}");
            }
            out.push('\n');
        }
    }
    write_text(path, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn jsonl_imports_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.jsonl",
            "{\"tok\": 1, \"layers\": [[0, 3], [1, 2]]}\n\n{\"tok\": 2, \"layers\": [[3, 5], [2, 4]]}\n",
        );
        let t = read_jsonl(&p).unwrap();
        assert_eq!((t.n_layer, t.n_expert, t.k), (2, 6, 2));
        assert_eq!(t.decode.steps(), 2);
        assert_eq!(t.decode.ids(1, 0), &[3, 5]);
        assert!(t.ids_sorted);
        let out = dir.path().join("b.jsonl");
        write_jsonl(&t, &out).unwrap();
        assert_eq!(read_jsonl(&out).unwrap(), t);
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        for (text, needle) in [
            (
                "{\"tok\": 1, \"layers\": [[0]]}\n{\"tok\": 2, \"layers\": [[0, 0]]}\n",
                "line 2",
            ),
            ("{\"tok\": 1, \"layers\": [[70000]]}\n", "out of range"),
            ("not json\n", "line 1"),
            (
                "{\"tok\": 1, \"layers\": [[1]], \"phase\": \"x\"}\n",
                "phase",
            ),
        ] {
            let p = write(dir.path(), "bad.jsonl", text);
            let e = read_jsonl(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert!(e.contains("bad.jsonl"), "{e}");
        }
    }

    #[test]
    fn csv_imports_with_and_without_header() {
        let dir = tempfile::tempdir().unwrap();
        let body = "0,1 2\n1,3 0\n0,2 4\n1,1 3\n";
        for text in [
            body.to_string(),
            format!("layer_id,expert_ids\n# c\n{body}"),
        ] {
            let p = write(dir.path(), "t.csv", &text);
            let t = read_csv(&p).unwrap();
            assert_eq!(t.decode.steps(), 2);
            assert_eq!(t.decode.ids(0, 1), &[3, 0]);
            assert_eq!(t.decode.ids(1, 0), &[2, 4]);
            assert_eq!((t.n_layer, t.n_expert, t.k), (2, 5, 2));
            assert!(!t.ids_sorted);
        }
        let p = write(dir.path(), "bad.csv", "0,1 2\n1,x\n");
        let e = read_csv(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn csv_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t.csv", "0,1 2\n1,3 0\n0,2 4\n1,1 3\n");
        let t = read_csv(&p).unwrap();
        let out = dir.path().join("o.csv");
        write_csv(&t, &out).unwrap();
        assert_eq!(read_csv(&out).unwrap(), t);
    }
}

//! The live page at `/spark/`: one self-contained HTML file (styles and script inline, no
//! external assets, so it works on an offline machine) that polls `/spark/status` and
//! `/spark/heat.json` every second and draws the child's state, requests and decode speed, the
//! shadow cache's hit ratio over time beside the Belady bound, residency counters, and an
//! expert heatmap per MoE layer with its colour scale.
//!
//! Owns the page asset and `/spark/heat.json` (the per-(layer, expert) counts the heatmap
//! draws). Reads the live snapshot only; never changes serving state. Served behind the same
//! API-key check as every `/spark/` route (the proxy checks it before routing here).

use hyper::StatusCode;
use serde_json::{json, Value};

use super::ServeState;

/// The page, embedded at build time.
pub const HTML: &str = include_str!("page.html");

/// What spark answers for a page route: status, content type, extra `Location` header, body.
pub struct PageAnswer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub location: Option<&'static str>,
    pub body: String,
}

/// The answer for `path` when it is one of the page's routes.
pub fn route(path: &str, state: &ServeState) -> Option<PageAnswer> {
    match path {
        "/spark" => Some(PageAnswer {
            status: StatusCode::PERMANENT_REDIRECT,
            content_type: "text/plain; charset=utf-8",
            location: Some("/spark/"),
            body: "the live page is at /spark/\n".into(),
        }),
        "/spark/" => Some(PageAnswer {
            status: StatusCode::OK,
            content_type: "text/html; charset=utf-8",
            location: None,
            body: HTML.to_string(),
        }),
        "/spark/heat.json" => Some(PageAnswer {
            status: StatusCode::OK,
            content_type: "application/json",
            location: None,
            body: heat_json(state).to_string(),
        }),
        _ => None,
    }
}

/// The heatmap's data: for every MoE layer, the prompt counts, the decode counts and the
/// decayed (recent) decode counts of each expert. Without the tap: `n_layer` 0 and a note.
pub fn heat_json(state: &ServeState) -> Value {
    let Some(live) = &state.live else {
        return json!({"n_layer": 0, "note": "served without the routing tap: no routing statistics"});
    };
    let s = live.shared.lock().unwrap_or_else(|e| e.into_inner());
    let layers: Vec<usize> = state
        .geometry
        .moe_layers
        .iter()
        .map(|l| l.layer as usize)
        .filter(|&l| l < s.decode.n_layer)
        .collect();
    let e = s.decode.n_expert;
    let rows = |c: &crate::cache::Counts| -> Vec<Vec<u64>> {
        layers.iter().map(|&l| c.layer(l).to_vec()).collect()
    };
    let recent: Vec<Vec<f64>> = layers
        .iter()
        .map(|&l| {
            s.decayed
                .get(l * e..(l + 1) * e)
                .map(|r| r.iter().map(|v| (v * 100.0).round() / 100.0).collect())
                .unwrap_or_default()
        })
        .collect();
    json!({
        "n_layer": layers.len(),
        "n_expert": e,
        "layers": layers,
        "half_life": live.cfg.half_life,
        "prompt": rows(&s.prompt),
        "decode": rows(&s.decode),
        "recent": recent,
        "totals": {"prompt": s.prompt.total(), "decode": s.decode.total()},
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_is_self_contained() {
        let html = super::HTML;
        for external in ["http://", "https://", "src=\"", "@import", "url("] {
            assert!(!html.contains(external), "the page refers to {external}");
        }
        assert!(html.contains("fetch(\"status\"") && html.contains("fetch(\"heat.json\""));
    }
}

//! The live page at `/spark/`: one self-contained HTML file (styles and script inline, no
//! external assets, so it works on an offline machine) that polls `/spark/status` and
//! `/spark/heat.json` every second and draws the child's state, requests and decode speed, the
//! shadow cache's hit ratio over time beside the Belady bound, residency counters, and an
//! expert heatmap per MoE layer with its colour scale.
//!
//! Owns the page asset and `/spark/heat.json` (the per-(layer, expert) counts the heatmap
//! draws, and the hit-ratio history of the last ten minutes, sampled every two seconds). Reads the live snapshot only; never changes serving state. Served behind the same
//! API-key check as every `/spark/` route (the proxy checks it before routing here).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::ServeState;

/// How often the hit-ratio history is sampled, and how much of it is kept (ten minutes).
pub const HISTORY_EVERY: Duration = Duration::from_secs(2);
const HISTORY_LEN: usize = 300;

/// One sample of the hit ratios: unix seconds, the shadow cache's over its window, the Belady
/// bound over the same steps, the residency provider's since serve started, every child's (each
/// `None` before there is any).
type Sample = (f64, Option<f64>, Option<f64>, Option<f64>);

/// The hit ratios over the last ten minutes, sampled on the serve runtime, so a page opened
/// now draws the past too.
#[derive(Debug, Default)]
pub struct History(Mutex<VecDeque<Sample>>);

impl History {
    fn push(&self, s: Sample) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() == HISTORY_LEN {
            h.pop_front();
        }
        h.push_back(s);
    }

    fn to_json(&self) -> Value {
        let h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Value::Array(
            h.iter()
                .map(|&(t, hit, bel, res)| json!({"t": t, "hit": hit, "bel": bel, "res": res}))
                .collect(),
        )
    }
}

/// The current hit ratios of `state`.
fn sample(state: &ServeState) -> Sample {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let Some(live) = &state.live else {
        return (now, None, None, None);
    };
    let s = live.shared.lock().unwrap_or_else(|e| e.into_inner());
    let ratio = |misses: u64| {
        (s.window_accesses > 0)
            .then(|| s.window_accesses.saturating_sub(misses) as f64 / s.window_accesses as f64)
    };
    (
        now,
        ratio(s.window_misses),
        ratio(s.window_belady_misses),
        s.residency_totals().and_then(|r| r.hit_ratio()),
    )
}

/// Samples `state`'s hit ratios into its history every [`HISTORY_EVERY`] until aborted.
pub fn spawn_history(state: Arc<ServeState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            state.history.push(sample(&state));
            tokio::time::sleep(HISTORY_EVERY).await;
        }
    })
}

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
        return json!({"n_layer": 0, "note": "served without the routing tap: no routing statistics", "history": state.history.to_json()});
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
        "history": state.history.to_json(),
        // The residency provider's counters per layer (`--residency`), as `/spark/status`
        // has them: the page's per-layer table.
        "residency_layers": if live.cfg.residency { s.residency_layers_json() } else { Value::Null },
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

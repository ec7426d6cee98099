//! The human report of `spark bench residency`.

use std::fmt::Write as _;

use spark_proto::control::RESIDENCY_EXIT_PREFIX;

use crate::units::mean;

use super::report::{BenchResidencyReport, BytesReport};
use super::{Config, ENV_OFFLOAD_MIN_BATCH, TARGET_RATIO};

/// The human report.
pub fn render(r: &BenchResidencyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model      {}: {} layers ({} with experts), {} experts, top-{}",
        r.model.display(),
        r.n_layer,
        r.expert_layers,
        r.n_expert,
        r.n_expert_used
    );
    let _ = writeln!(
        s,
        "decode     llama-bench -p 0 -n {} -r {} -t {} -ngl 99; {} tokens decoded per run ({} × {} timed + 1 warmup)",
        r.tokens, r.reps, r.threads, r.decoded_per_run, r.reps, r.tokens
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "    {:<10} {:<56} {:>20} {:>7}",
        "config", "placement", "tok/s (mean ± sd)", "vs (b)"
    );
    for row in &r.rows {
        // A hooked build without the provider takes the stock path; say which build ran.
        let build = if row.config.stock() && row.engine.contains("-hooked-") {
            "hooked (no tap)"
        } else if row.config.stock() {
            "stock"
        } else {
            "hooked"
        };
        let placement = match row.config {
            Config::Vram => format!("{build}, experts in VRAM"),
            Config::Host => format!("{build}, -ncmoe {} (experts on host)", row.n_cpu_moe),
            Config::HostCopy => {
                format!(
                    "{build}, -ncmoe {}, {ENV_OFFLOAD_MIN_BATCH}=1",
                    row.n_cpu_moe
                )
            }
            Config::Spark => format!(
                "{build}, -ncmoe {}, min batch 1, tap, {} slots/layer",
                row.n_cpu_moe,
                r.slots.unwrap_or(0)
            ),
        };
        let _ = writeln!(
            s,
            "({}) {:<10} {:<56} {:>11.2} ± {:>6.2} {:>7}",
            row.letter,
            row.config.name(),
            placement,
            row.tok_s,
            row.sd,
            row.ratio_to_host
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into())
        );
    }
    let _ = writeln!(s);
    let target = match r.target.measured {
        Some(x) => format!(
            "measured {x:.2}x{} (the issue's goal; reported, not checked)",
            if x >= TARGET_RATIO { "" } else { ", below it" }
        ),
        None => "not measured (needs host and spark in --configs)".into(),
    };
    let _ = writeln!(s, "target     {}: {target}", r.target.goal);
    if let Some(res) = &r.residency {
        let _ = writeln!(
            s,
            "residency  (d) {} slots per expert layer ({})",
            r.slots.unwrap_or(0),
            r.slots_from.as_deref().unwrap_or("-")
        );
        match &res.counters {
            Some(c) => {
                let g = |k: &str| c.get(k).copied().unwrap_or(0);
                let _ = writeln!(
                    s,
                    "           hit ratio {}, hits {}, loads {}, streamed {}, calls {}, declined {}",
                    res.hit_ratio
                        .map(|h| format!("{h:.3}"))
                        .unwrap_or_else(|| "-".into()),
                    g("hits"),
                    g("loads"),
                    g("streamed"),
                    g("calls"),
                    g("declined")
                );
                let _ = writeln!(
                    s,
                    "           bytes_hit {}, bytes_host {}; per decoded token: {} from host, {} from slots",
                    g("bytes_hit"),
                    g("bytes_host"),
                    mean(res.host_bytes_per_token.unwrap_or(0.0)),
                    mean(res.slot_bytes_per_token.unwrap_or(0.0))
                );
                let _ = writeln!(
                    s,
                    "           copy calls per decoded token: {} host→device (one per run of experts not in slots; {} before batching, one per loaded expert), {} device→device",
                    opt2(res.host_copies_per_token),
                    opt2(res.host_copies_unbatched_per_token),
                    opt2(res.device_copies_per_token)
                );
                let _ = writeln!(
                    s,
                    "           {RESIDENCY_EXIT_PREFIX}{}",
                    res.line.as_deref().unwrap_or("")
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "           {}{}",
                    res.note.as_deref().unwrap_or("no residency line"),
                    res.line
                        .as_deref()
                        .map(|l| format!(": {l}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    if let Some(p) = &r.prefill {
        render_prefill(&mut s, p);
    }
    if let Some(b) = &r.bytes {
        render_bytes(&mut s, b, r);
    }
    let e = &r.engines;
    let mut first = true;
    let mut engine_line = |label: &str, text: String| {
        let head = if first { "engines" } else { "" };
        first = false;
        let _ = writeln!(s, "{head:<10} {label:<7}{text}");
    };
    if let Some(st) = &e.stock {
        engine_line(
            "stock",
            format!("{} {}", st.variant, st.llama_bench.display()),
        );
    }
    if let Some(h) = &e.hooked {
        engine_line(
            "hooked",
            format!("{} {}", h.variant, h.llama_bench.display()),
        );
    }
    if let Some(t) = &e.tap {
        engine_line("tap", t.display().to_string());
    }
    let _ = writeln!(s, "machine    GPU: {}", r.machine.gpu);
    let _ = writeln!(
        s,
        "           CPU: {}",
        if r.machine.cpu.is_empty() {
            "-"
        } else {
            &r.machine.cpu
        }
    );
    if r.bytes.as_ref().is_some_and(|b| b.cpu_device) {
        let _ = writeln!(
            s,
            "note       the device is Mesa's lavapipe, a CPU that poses as a Vulkan GPU: tok/s here are\n           not GPU figures; the bytes and hit ratios are what a GPU would see"
        );
    }
    if !r.machine.ran_on_gpu {
        let _ = writeln!(
            s,
            "note       llama-bench ran on the CPU only: the placements do not differ here, the hook is\n           never called, and these numbers say nothing about residency"
        );
    }
    s
}

/// Two decimals, or `-`.
fn opt2(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

fn render_prefill(s: &mut String, p: &super::PrefillReport) {
    let _ = writeln!(
        s,
        "prefill    (d) after {}-token prompts: llama-bench -pg {},{} ({} slots/layer); decode hit ratio = the
           narrow calls alone; wide calls are the prompt batches (more than 2 × top-k experts used)",
        p.prompt, p.prompt, p.tokens, p.slots
    );
    let _ = writeln!(
        s,
        "           {:<8} {:>11} {:>17} {:>10} {:>10} {:>12} {:>12}",
        "prompts",
        "pg tok/s",
        "decode hit ratio",
        "wide calls",
        "wide loads",
        "wide streamed",
        "host copies/tok"
    );
    for row in &p.rows {
        let c = row.residency.counters.as_ref();
        let g = |k: &str| {
            c.and_then(|c| c.get(k))
                .map_or("-".into(), |v| v.to_string())
        };
        let _ = writeln!(
            s,
            "           {:<8} {:>11.2} {:>17} {:>10} {:>10} {:>12} {:>12}",
            row.rule,
            row.pg_tok_s,
            row.residency
                .decode_hit_ratio
                .map_or_else(|| "-".into(), |h| format!("{h:.3}")),
            g("wide_calls"),
            g("wide_loads"),
            g("wide_streamed"),
            opt2(row.residency.host_copies_per_token)
        );
        if let Some(n) = &row.residency.note {
            let _ = writeln!(s, "               {n}");
        }
    }
    let _ = writeln!(
        s,
        "           admit: prompt batches take slots like decode (the rule before); stream: their one-off uses
           are streamed and only free slots or lower plan levels are taken (SPARK_RESIDENCY_PREFILL)"
    );
}

fn render_bytes(s: &mut String, b: &BytesReport, r: &BenchResidencyReport) {
    let decoded = b.rows.first().map_or(0, |x| x.decoded);
    let _ = writeln!(
        s,
        "bytes      host→device per decoded token: hooked llama-bench -n {} -r 1 ({decoded} tokens with the warmup),\n           experts of all {} layers on the host, decode offloaded, on {}",
        r.tokens,
        r.n_layer,
        if b.device.is_empty() { "-" } else { &b.device }
    );
    let _ = writeln!(
        s,
        "           {:<14} {:>5} {:>9} {:>15} {:>12} {:>12} {:>22}",
        "config",
        "slots",
        "hit ratio",
        "predicted (lru)",
        "host/token",
        "slots/token",
        format!("at {} GB/s (forecast)", b.link_gbps)
    );
    let opt = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map(f).unwrap_or_else(|| "-".into());
    for row in &b.rows {
        let _ = writeln!(
            s,
            "           ({}) {:<10} {:>5} {:>9} {:>15} {:>12} {:>12} {:>22}",
            row.config.letter(),
            row.config.name(),
            row.slots.map_or("-".into(), |x| x.to_string()),
            opt(
                row.residency.hit_ratio.filter(|_| row.slots.is_some()),
                &|h| format!("{h:.3}")
            ),
            opt(row.predicted_hit_ratio, &|h| format!("{h:.3}")),
            opt(row.residency.host_bytes_per_token, &mean),
            opt(
                row.residency
                    .slot_bytes_per_token
                    .filter(|_| row.slots.is_some()),
                &mean
            ),
            opt(row.link_ms_per_token, &|ms| format!("{ms:.4} ms/token")),
        );
        if let Some(sp) = &row.slots_per_layer {
            let _ = writeln!(s, "               slots per layer (layer:slots): {sp}");
        }
        if let Some(n) = &row.note {
            let _ = writeln!(s, "               {n}");
        }
    }
    let _ = writeln!(
        s,
        "           (c) is metered at the hook: the provider declines and counts what the stock copy moves.\n           The prediction replays the routing the same run captured (the tap's ring) through spark's\n           lru cache; the provider breaks ties between experts loaded in the same step by slot, lru by\n           order, which can move a few hits. The forecast is host bytes ÷ link bandwidth only."
    );
}

//! `spark plan`'s text: a plan, and the receipt table.

use crate::units::mib;

use super::fit::{FitOutcome, Placement};
use super::receipt::Receipt;
use super::Plan;

/// Renders a plan as text.
pub fn render(p: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let m = &p.model;
    let _ = writeln!(
        s,
        "model     {} ({}, {} layers, {})",
        m.path,
        m.architecture,
        m.n_layer,
        if m.is_moe() {
            format!("{} experts, {} used", m.n_expert, m.n_expert_used)
        } else {
            "dense".into()
        }
    );
    let hw = &p.hardware;
    let _ = writeln!(
        s,
        "machine   {} ({} CPUs), RAM {} total / {} available, host read {:.1} GB/s at {} threads{}",
        hw.machine.cpu_model,
        hw.machine.logical_cpus,
        mib(hw.ram_total_bytes),
        mib(hw.ram_available_bytes),
        hw.host_gbps_at(p.threads),
        p.threads,
        match &hw.gpu {
            Some(g) => format!(", GPU {} at {:.0} GB/s", g.name, g.vram_gbps),
            None => ", no GPU".into(),
        }
    );
    let mem = &p.memory;
    let _ = writeln!(s, "memory");
    let _ = writeln!(
        s,
        "  always resident      {:>12}  (attention, norms, router, output, shared experts)",
        mib(mem.always_resident_bytes)
    );
    let _ = writeln!(
        s,
        "  embeddings (host)    {:>12}",
        mib(mem.embeddings_host_bytes)
    );
    if m.is_moe() {
        let per: Vec<u64> = mem
            .routed_expert_bytes_per_layer
            .iter()
            .map(|x| x.1)
            .collect();
        let uniform = per.windows(2).all(|w| w[0] == w[1]);
        let _ = writeln!(
            s,
            "  routed experts       {:>12}  ({} per layer{})",
            mib(mem.routed_expert_bytes),
            if uniform {
                mib(per.first().copied().unwrap_or(0))
            } else {
                "varies".into()
            },
            if uniform { "" } else { ", see --json" }
        );
    }
    let _ = writeln!(
        s,
        "  KV cache             {:>12}  (ctx {}, K {}, V {}, {} B/token)",
        mib(mem.kv_bytes),
        p.settings.ctx,
        p.settings.k_type.name,
        p.settings.v_type.name,
        mem.kv_bytes_per_token
    );
    let _ = writeln!(
        s,
        "  compute buffer       {:>12}  (ubatch {})",
        mib(mem.compute_bytes),
        p.settings.ubatch
    );
    if p.budget_bytes.is_some() {
        let _ = writeln!(s, "  runtime reserve      {:>12}", mib(mem.reserve_bytes));
    }
    match &p.outcome {
        FitOutcome::Fits {
            placement,
            usage,
            headroom_bytes,
        } => {
            let what = match placement {
                Placement::AllGpu => "all layers and experts on the GPU".to_string(),
                Placement::CpuMoe { n } => format!(
                    "experts of layers 0..{n} in host memory ({} of {} MoE layers), the rest on the GPU",
                    m.expert_layers.iter().filter(|(l, _)| l < n).count(),
                    m.expert_layers.len()
                ),
                Placement::CpuOnly => "CPU only (no --vram-budget)".into(),
            };
            let _ = writeln!(s, "fit       {what}");
            if let Some(b) = p.budget_bytes {
                let _ = writeln!(
                    s,
                    "          VRAM {} of {} budget ({} headroom), host {}",
                    mib(usage.vram_bytes),
                    mib(b),
                    mib(*headroom_bytes),
                    mib(usage.host_bytes)
                );
            } else {
                let _ = writeln!(s, "          host {}", mib(usage.host_bytes));
            }
            let _ = writeln!(
                s,
                "flags     -m {} {}",
                shell_quote(&m.path),
                p.flags.join(" ")
            );
        }
        FitOutcome::Refused(r) => {
            let _ = writeln!(s, "refused   {}", r.reason);
            let _ = writeln!(s, "what would help");
            for h in &r.suggestions {
                let _ = writeln!(s, "  - {h}");
            }
        }
    }
    if let Some(f) = &p.forecast {
        let r = &f.roofline;
        let _ = writeln!(
            s,
            "forecast  decode {:.1} tok/s (band {:.1}–{:.1}), ceiling {:.1} tok/s [{}]",
            f.decode.tps,
            f.decode.low,
            f.decode.high,
            r.decode_tps,
            r.regime.name()
        );
        let _ = writeln!(
            s,
            "          reads per token: {} from VRAM, {} from host",
            mib(r.vram_bytes_per_token),
            mib(r.host_bytes_per_token)
        );
        let _ = writeln!(
            s,
            "          prefill {:.0} tok/s (band {:.0}–{:.0}), ceiling {:.0} tok/s",
            f.prefill.tps, f.prefill.low, f.prefill.high, r.prefill_tps
        );
        let _ = writeln!(s, "assumptions");
        for a in &f.assumptions {
            let _ = writeln!(s, "  - {a}");
        }
    }
    if let Some(c) = &p.routing {
        let _ = writeln!(s, "routing   {}", c.verdict);
    }
    for src in &p.hardware.sources {
        let _ = writeln!(s, "source    {src}");
    }
    s
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Renders receipts as a table.
pub fn render_receipts(rs: &[Receipt]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<34} {:<18} {:>10} {:>10} {:>10} {:>8} {:>7} {:>6}",
        "configuration", "regime", "ceiling", "forecast", "measured", "error", "eff", "band"
    );
    for r in rs {
        let err = r
            .decode_error()
            .map(|e| format!("{:+.1}%", e * 100.0))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<34} {:<18} {:>10.1} {:>10.1} {:>10} {:>8} {:>7} {:>6}",
            r.settings,
            r.regime.name(),
            r.decode_ceiling_tps,
            r.decode_forecast_tps,
            r.decode_measured_tps
                .map(|m| format!("{m:.1}"))
                .unwrap_or_else(|| "-".into()),
            err,
            r.decode_efficiency()
                .map(|e| format!("{e:.2}"))
                .unwrap_or_else(|| "-".into()),
            match r.decode_inside_band() {
                Some(true) => "inside",
                Some(false) => "OUT",
                None => "-",
            }
        );
    }
    s
}

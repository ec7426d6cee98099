//! The text form of `spark plan --residency`: the two columns side by side with every term,
//! the candidate splits, the per-layer hit ratios, the verdict and the assumptions. `--json`
//! serialises [`super::ResidencyForecast`] itself; this is only its reading for a person.

use super::ResidencyForecast;
use crate::units::{mib, MIB};

/// Renders the forecast as text: the two columns, every term, the curve and the verdict.
pub fn render(f: &ResidencyForecast) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mb = |b: f64| format!("{:.1} MiB", b / MIB as f64);
    let ms = |t: f64| format!("{:.2} ms", t * 1e3);
    let _ = writeln!(s, "residency: does it pay here?");
    let sp = f.spark.as_ref();
    let col = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    let row = |s: &mut String, name: &str, a: String, b: Option<String>| {
        let _ = writeln!(s, "  {name:<28} {a:>20} {:>20}", col(b));
    };
    let _ = writeln!(
        s,
        "  {:<28} {:>20} {:>20}",
        "", "(b) stock", "(d) spark residency"
    );
    row(
        &mut s,
        "placement",
        format!("--n-cpu-moe {}", f.stock.n_cpu_moe),
        sp.map(|c| format!("--n-cpu-moe {} + {}", c.n_cpu_moe, slot_range(c))),
    );
    row(
        &mut s,
        "host expert layers",
        f.stock.host_layers.to_string(),
        sp.map(|c| c.host_layers.to_string()),
    );
    row(
        &mut s,
        "VRAM used",
        mib(f.stock.vram_bytes),
        sp.map(|c| mib(c.vram_bytes)),
    );
    row(
        &mut s,
        "hit ratio (host layers)",
        "-".into(),
        sp.and_then(|c| c.hit_ratio)
            .map(|h| format!("{:.1}%", h * 100.0)),
    );
    row(
        &mut s,
        "link bytes/token",
        mb(f.stock.link_bytes),
        sp.map(|c| mb(c.link_bytes)),
    );
    row(
        &mut s,
        "host-memory bytes/token",
        mb(f.stock.host_bytes),
        sp.map(|c| mb(c.host_bytes)),
    );
    row(
        &mut s,
        "VRAM read bytes/token",
        mb(f.stock.vram_read_bytes),
        sp.map(|c| mb(c.vram_read_bytes)),
    );
    row(
        &mut s,
        "VRAM slot copies/token",
        mb(f.stock.vram_copy_bytes),
        sp.map(|c| format!("{} ({:.0} calls)", mb(c.vram_copy_bytes), c.device_copies)),
    );
    row(
        &mut s,
        "host copies/token",
        "-".into(),
        sp.map(|c| format!("{:.0}", c.host_copies)),
    );
    row(
        &mut s,
        "hand-offs/token",
        format!("{:.0}", f.stock.handoffs),
        sp.map(|c| format!("{:.0}", c.handoffs)),
    );
    row(
        &mut s,
        "time: VRAM",
        ms(f.stock.t_vram),
        sp.map(|c| ms(c.t_vram)),
    );
    row(
        &mut s,
        "time: host read",
        ms(f.stock.t_host),
        sp.map(|c| ms(c.t_host)),
    );
    row(
        &mut s,
        if f.machine.type_costs.is_some() {
            "time: host compute+read"
        } else {
            "time: host compute"
        },
        ms(f.stock.t_host_compute),
        sp.map(|c| ms(c.t_host_compute)),
    );
    row(
        &mut s,
        "time: link",
        ms(f.stock.t_link),
        sp.map(|c| ms(c.t_link)),
    );
    row(
        &mut s,
        "time: hand-offs / copy calls",
        ms(f.stock.t_fixed),
        sp.map(|c| ms(c.t_fixed)),
    );
    row(
        &mut s,
        "ceiling tok/s",
        format!("{:.1}", f.stock.ceiling_tps),
        sp.map(|c| format!("{:.1}", c.ceiling_tps)),
    );
    row(
        &mut s,
        "decode tok/s (band)",
        format!(
            "{:.1} ({:.1}–{:.1})",
            f.stock.tps, f.stock.low, f.stock.high
        ),
        sp.map(|c| format!("{:.1} ({:.1}–{:.1})", c.tps, c.low, c.high)),
    );
    let _ = writeln!(s, "break-even {}", f.break_even_note);
    let _ = writeln!(s, "verdict   {}", f.reason);
    if !f.candidates.is_empty() {
        let _ = writeln!(
            s,
            "splits    host layers | same slots in each: slots  hits   tok/s | runs: slots/layer   hits    link/token   tok/s"
        );
        for c in &f.candidates {
            let _ = writeln!(
                s,
                "          {:>11} | {:>25} {:>5.1}% {:>7.1} | {:>16} {:>5.1}% {:>12} {:>7.1}",
                c.host_layers,
                c.slots,
                c.uniform_hit_ratio.unwrap_or(0.0) * 100.0,
                c.uniform_tps.unwrap_or(c.tps),
                slot_range(c),
                c.hit_ratio.unwrap_or(0.0) * 100.0,
                mb(c.link_bytes),
                c.tps
            );
        }
    }
    if let Some(p) = f
        .curve
        .iter()
        .find(|p| Some(p.slots) == sp.map(|c| c.slots))
    {
        let lo = p
            .per_layer
            .iter()
            .map(|x| x.1)
            .fold(f64::INFINITY, f64::min);
        let hi = p.per_layer.iter().map(|x| x.1).fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "per layer at {} slots in each: hit ratio {:.1}%–{:.1}% (mean {:.1}%; every layer at every count in --json)",
            p.slots,
            lo * 100.0,
            hi * 100.0,
            p.hit_ratio * 100.0
        );
    }
    if let Some(c) = sp {
        let what = if c.per_layer {
            format!(
                "per-layer split ({:.1} tok/s, {:.1}% hits; the same VRAM as {} slots in each: {:.1} tok/s, {:.1}% hits)",
                c.tps,
                c.hit_ratio.unwrap_or(0.0) * 100.0,
                c.slots,
                c.uniform_tps.unwrap_or(0.0),
                c.uniform_hit_ratio.unwrap_or(0.0) * 100.0
            )
        } else {
            "the same count in each (no per-layer split forecast faster)".into()
        };
        let _ = writeln!(s, "slots per layer, {what}; layer:slots (hits)");
        for chunk in c.slots_per_layer.chunks(8) {
            let row: Vec<String> = chunk
                .iter()
                .map(|x| {
                    format!(
                        "{:>3}:{:<3} ({:>3.0}%)",
                        x.layer,
                        x.slots,
                        x.hit_ratio.unwrap_or(0.0) * 100.0
                    )
                })
                .collect();
            let _ = writeln!(s, "  {}", row.join("  "));
        }
    }
    let _ = writeln!(s, "assumptions");
    for a in &f.assumptions {
        let _ = writeln!(s, "  - {a}");
    }
    for src in &f.machine.sources {
        let _ = writeln!(s, "source    {src}");
    }
    s
}

/// The slots a split runs: `N` when every host layer has N, else `lo–hi`.
fn slot_range(c: &super::Side) -> String {
    let v = c.slots_per_layer.iter().map(|x| x.slots);
    match (v.clone().min(), v.max()) {
        (Some(lo), Some(hi)) if lo != hi => format!("{lo}–{hi} slots/layer"),
        (Some(lo), _) => format!("{lo} slots/layer"),
        _ => format!("{} slots/layer", c.slots),
    }
}

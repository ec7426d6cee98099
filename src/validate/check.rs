//! `spark validate`: replay the held-out chunks, score resident sets on their real routing, write
//! `report.json` and `report.md`, and turn the result into an exit status.
//!
//! Owns the report: per chunk the prompt and decode rates the server measured; from the captured
//! routing, the cold-hit rate (share of selected experts not resident when a token needs them)
//! at one slot budget for a uniform set (the first S experts of every layer, what a
//! calibration-free static split gives), the calibrated static set (the profile's top S),
//! pinned + cache (pin-lru from the profile), spark's default policy (seeded with the profile)
//! and the Belady bound; the thresholds. Scoring goes through [`Experiment`], never a second
//! simulator. A run that ends early (timeout, interrupt, dead server) still writes its report,
//! with the status saying why; the report files are always written atomically.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use spark_proto::trace::{TraceHeader, FLAG_HAS_PROMPT, FLAG_WEIGHTS};

use super::replay::{replay, ChunkRun};
use super::{jobs, Progress, ServerArgs, ValidateError};
use crate::cache::{Counts, PolicyKind};
use crate::gguf::MoeGeometry;
use crate::profile::Profile;
use crate::sessions::{Corpus, Split};
use crate::simulate::{default_slots, Experiment};
use crate::svg;
use crate::trace::{Routing, Trace};

#[derive(Debug, Clone, clap::Args)]
pub struct ValidateArgs {
    /// The GGUF model to serve
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// The calibrated profile (`spark calibrate`)
    #[arg(long)]
    pub profile: PathBuf,
    /// Corpus directory written by `spark sessions extract` (its held-out chunks are replayed)
    #[arg(long)]
    pub corpus: PathBuf,
    /// Directory for report.json, report.md and the plot
    #[arg(long, value_name = "DIR")]
    pub report: PathBuf,
    /// VRAM budget for experts in MiB: slots per layer = budget / (one expert of every layer)
    #[arg(long, value_name = "N", conflicts_with = "slots")]
    pub budget_mib: Option<f64>,
    /// Expert slots per layer (default: a quarter of the experts, at least top-k)
    #[arg(long, value_name = "S")]
    pub slots: Option<u32>,
    /// Seconds the whole run may take
    #[arg(long, default_value_t = 3600, value_name = "S")]
    pub deadline: u64,
    /// Fail (exit 1) when spark's policy hits resident experts less often than this (0..1)
    #[arg(long, value_name = "X")]
    pub min_hit_ratio: Option<f64>,
    /// Fail (exit 1) when spark's policy has a higher cold-hit rate than this (0..1)
    #[arg(long, value_name = "X")]
    pub max_cold_rate: Option<f64>,
    #[command(flatten)]
    pub server: ServerArgs,
    /// No progress lines
    #[arg(long)]
    pub quiet: bool,
}

/// One replayed held-out chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkRow {
    pub key: String,
    pub prompt_tokens: usize,
    pub prompt_tps: Option<f64>,
    pub generated: usize,
    pub decode_tps: Option<f64>,
    pub seconds: f64,
    pub records: usize,
}

/// One resident set's cold hits.
#[derive(Debug, Clone, Serialize)]
pub struct SetRow {
    pub set: String,
    pub policy: String,
    pub cold: u64,
    pub lookups: u64,
    pub cold_rate: f64,
    pub hit_ratio: f64,
    /// Cold hits relative to Belady's (None when Belady has none).
    pub vs_belady: Option<f64>,
}

/// Resident sets scored on one stretch of routing.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub steps: usize,
    pub rows: Vec<SetRow>,
}

/// A point of the cold-rate curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub slots: u32,
    pub set: String,
    pub cold_rate: f64,
}

/// A threshold and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub name: String,
    pub limit: f64,
    pub value: Option<f64>,
    pub ok: bool,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `pass` (thresholds given, all met), `measured` (no thresholds given: scores only), `fail`
    /// (a threshold missed, or no decode token scored), `timeout`, `interrupted` or `error`.
    pub status: String,
    /// The status in one line with its reason, as report.md and the command print it.
    pub verdict: String,
    pub error: Option<String>,
    pub model: String,
    pub fingerprint: String,
    pub profile: String,
    pub corpus: String,
    pub n_layer: u32,
    pub n_expert: u32,
    pub k: u32,
    pub slots: u32,
    pub budget_mib: Option<f64>,
    pub chunk_tokens: usize,
    pub n_gen: u32,
    pub chunks_planned: usize,
    pub chunks: Vec<ChunkRow>,
    pub prompt_tps_mean: Option<f64>,
    pub decode_tps_mean: Option<f64>,
    /// Scored on the decode tokens (one token at a time: where residency decides speed).
    pub decode: Option<Scores>,
    /// Scored on every token in order, prompt tokens included.
    pub all_tokens: Option<Scores>,
    pub curve: Vec<CurvePoint>,
    pub checks: Vec<CheckRow>,
    pub elapsed_s: f64,
}

/// What a finished validation wrote.
#[derive(Debug, Clone)]
pub struct ValidateOutcome {
    pub report: Report,
    pub json: PathBuf,
    pub markdown: PathBuf,
}

/// The resident sets of the report, in order: (name, policy, ranking counts).
const SETS: [(&str, PolicyKind); 5] = [
    ("uniform", PolicyKind::Static),
    ("calibrated static", PolicyKind::Static),
    ("pinned + cache", PolicyKind::PinLru),
    ("spark", PolicyKind::Spark),
    ("belady bound", PolicyKind::Belady),
];

/// Scores the resident sets on `routing` at `slots` per layer; `profile` ranks and seeds them.
pub fn score(routing: &Routing, n_expert: usize, k: usize, slots: u32, profile: &Counts) -> Scores {
    let per_layer = vec![slots; routing.n_layer()];
    let uniform = Counts::zero(profile.n_layer, profile.n_expert);
    let mut rows: Vec<SetRow> = SETS
        .iter()
        .enumerate()
        .map(|(i, &(name, kind))| {
            let counts = if i == 0 { &uniform } else { profile };
            let e = Experiment {
                routing,
                n_expert,
                k,
                calibrate_steps: 0,
                counts: counts.clone(),
                prior: (i != 0).then(|| profile.clone()),
            };
            let o = e.run(kind, &per_layer);
            let rate = if o.accesses == 0 {
                0.0
            } else {
                o.misses as f64 / o.accesses as f64
            };
            SetRow {
                set: name.to_string(),
                policy: kind.name().to_string(),
                cold: o.misses,
                lookups: o.accesses,
                cold_rate: rate,
                hit_ratio: 1.0 - rate,
                vs_belady: None,
            }
        })
        .collect();
    let belady = rows.last().map(|r| r.cold).unwrap_or(0);
    for r in &mut rows {
        r.vs_belady = (belady > 0).then(|| r.cold as f64 / belady as f64);
    }
    Scores {
        steps: routing.steps(),
        rows,
    }
}

fn append(out: &mut Routing, r: &Routing) {
    for s in 0..r.steps() {
        let (q, t) = r.token(s);
        out.push_step(
            q,
            t,
            (0..r.n_layer()).map(|l| (r.ids(s, l), r.weights(s, l))),
        );
    }
}

/// The slots per layer that `budget_mib` buys: one expert of every MoE layer per slot.
pub fn slots_for_budget(geo: &MoeGeometry, budget_mib: f64) -> Result<u32, String> {
    if !(budget_mib.is_finite() && budget_mib > 0.0) {
        return Err(format!(
            "parse --budget-mib {budget_mib}: must be a positive number"
        ));
    }
    let per_slot: u64 = geo.moe_layers.iter().map(|m| m.expert_bytes).sum();
    if per_slot == 0 {
        return Err("size the budget: the model reports no expert bytes".into());
    }
    let slots = (budget_mib * 1024.0 * 1024.0 / per_slot as f64).floor() as u64;
    if slots == 0 {
        return Err(format!(
            "fit --budget-mib {budget_mib}: one expert of every layer takes {:.3} MiB",
            per_slot as f64 / 1048576.0
        ));
    }
    Ok(slots.min(u64::from(geo.n_expert)) as u32)
}

/// The markdown table of the decode scores (or a line saying there are none).
pub fn policy_table(r: &Report) -> String {
    match &r.decode {
        Some(s) => scores_table(s),
        None => "no decode tokens were scored: nothing to compare\n".into(),
    }
}

fn scores_table(s: &Scores) -> String {
    let mut o = String::from(
        "| resident set | policy | cold hits | lookups | cold-hit rate | hit ratio | × belady |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in &s.rows {
        o.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} | {:.4} | {} |\n",
            r.set,
            r.policy,
            r.cold,
            r.lookups,
            r.cold_rate,
            r.hit_ratio,
            r.vs_belady.map_or("–".into(), |v| format!("{v:.2}"))
        ));
    }
    o
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

/// `report.md`.
pub fn render_markdown(r: &Report) -> String {
    let mut o = format!("# spark validate: {}\n\n{}\n\n", r.status, r.verdict);
    o.push_str(&format!(
        "- model: `{}` ({} layers, {} experts, top-{}), fingerprint `{}`\n- profile: `{}`\n- corpus: `{}`, {} of {} held-out chunks replayed ({} prompt tokens max, {} generated)\n- budget: {} slots per layer{}\n- prompt {} tok/s, decode {} tok/s (means over chunks); {:.1} s\n\n",
        r.model, r.n_layer, r.n_expert, r.k, r.fingerprint, r.profile, r.corpus,
        r.chunks.len(), r.chunks_planned, r.chunk_tokens, r.n_gen, r.slots,
        r.budget_mib.map_or(String::new(), |b| format!(" ({b} MiB)")),
        opt(r.prompt_tps_mean), opt(r.decode_tps_mean), r.elapsed_s,
    ));
    if let Some(s) = &r.decode {
        o.push_str(&format!(
            "## Cold-hit rate at {} slots, decode tokens ({} steps)\n\n",
            r.slots, s.steps
        ));
        o.push_str(&scores_table(s));
        o.push('\n');
    }
    if let Some(s) = &r.all_tokens {
        o.push_str(&format!(
            "## Cold-hit rate at {} slots, every token in order ({} steps)\n\n",
            r.slots, s.steps
        ));
        o.push_str(&scores_table(s));
        o.push('\n');
    }
    if !r.curve.is_empty() {
        o.push_str("![cold-hit rate against slots](cold_rate.svg)\n\n");
    }
    o.push_str("## Chunks\n\n| chunk | prompt tokens | prompt tok/s | generated | decode tok/s | seconds |\n| --- | ---: | ---: | ---: | ---: | ---: |\n");
    for c in &r.chunks {
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} |\n",
            c.key,
            c.prompt_tokens,
            opt(c.prompt_tps),
            c.generated,
            opt(c.decode_tps),
            c.seconds
        ));
    }
    if !r.checks.is_empty() {
        o.push_str(
            "\n## Checks\n\n| check | limit | value | result |\n| --- | ---: | ---: | --- |\n",
        );
        for c in &r.checks {
            o.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                c.name,
                c.limit,
                c.value.map_or("–".into(), |v| format!("{v:.4}")),
                if c.ok { "ok" } else { "missed" }
            ));
        }
    }
    o
}

fn plot(r: &Report) -> String {
    let mut series: Vec<svg::Series> = Vec::new();
    for p in &r.curve {
        let point = (f64::from(p.slots), p.cold_rate);
        match series.iter_mut().find(|s| s.name == p.set) {
            Some(s) => s.points.push(point),
            None => series.push(svg::Series {
                name: p.set.clone(),
                points: vec![point],
            }),
        }
    }
    svg::line_chart(
        "held-out cold-hit rate vs slots per layer (decode tokens)",
        "slots per layer",
        "cold-hit rate",
        &series,
    )
}

fn write_report(dir: &Path, r: &Report) -> Result<(PathBuf, PathBuf), ValidateError> {
    let json = dir.join("report.json");
    let md = dir.join("report.md");
    if !r.curve.is_empty() {
        let p = dir.join("cold_rate.svg");
        crate::atomic_file::write_atomic(&p, plot(r).as_bytes())
            .map_err(|e| ValidateError::io(&p, e))?;
    }
    let text = serde_json::to_string_pretty(r).expect("report serialises");
    crate::atomic_file::write_atomic(&json, text.as_bytes())
        .map_err(|e| ValidateError::io(&json, e))?;
    crate::atomic_file::write_atomic(&md, render_markdown(r).as_bytes())
        .map_err(|e| ValidateError::io(&md, e))?;
    Ok((json, md))
}

fn mean(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let xs: Vec<f64> = v.flatten().collect();
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// The report's status and its one-line verdict. Only a run stopped by a deadline, an
/// interrupt or a failure before its last chunk "ended early"; a missed threshold or nothing
/// scored is a `fail` of a finished run; no thresholds at all is `measured`, never `pass`.
fn verdict(
    result: &Result<(), ValidateError>,
    checks: &[CheckRow],
    decode_steps: usize,
    replayed: usize,
    planned: usize,
) -> (String, String) {
    let status = match result {
        Ok(()) if checks.is_empty() => "measured",
        Ok(()) => "pass",
        Err(e) => e.status(),
    };
    let line = match result {
        Ok(()) if checks.is_empty() => format!(
            "measured: {decode_steps} decode tokens scored; no thresholds given \
             (--min-hit-ratio, --max-cold-rate), so nothing was passed or failed"
        ),
        Ok(()) => format!(
            "pass: {decode_steps} decode tokens scored; every threshold met ({})",
            checks
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Err(ValidateError::Threshold(m)) => format!("fail: missed {m}"),
        Err(ValidateError::NothingScored(m)) => format!("fail: {m}"),
        Err(e @ (ValidateError::Timeout(_) | ValidateError::Interrupted)) => {
            format!("ended early, {replayed} of {planned} chunks replayed: {e}")
        }
        Err(ValidateError::Telemetry(t)) if t.is_timeout() => {
            format!("ended early, {replayed} of {planned} chunks replayed: {t}")
        }
        Err(e) if replayed < planned => {
            format!("ended early, {replayed} of {planned} chunks replayed: failed to {e}")
        }
        Err(e) => format!("error after every chunk was replayed: failed to {e}"),
    };
    (status.into(), line)
}

/// Runs `spark validate`: always leaves a report when it got as far as the report directory.
/// Errors after the report is written: a missed threshold, a timeout, an interrupt, a server
/// failure (each with its exit code, [`ValidateError::exit_code`]).
pub fn validate(
    a: &ValidateArgs,
    interrupt: Option<Arc<AtomicBool>>,
) -> Result<ValidateOutcome, ValidateError> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.deadline.max(1));
    for (flag, v) in [
        ("--min-hit-ratio", a.min_hit_ratio),
        ("--max-cold-rate", a.max_cold_rate),
    ] {
        if let Some(x) = v {
            if !(0.0..=1.0).contains(&x) {
                return Err(ValidateError::Usage(format!(
                    "parse {flag} {x}: must be between 0 and 1"
                )));
            }
        }
    }
    if a.server.n_gen == 0 {
        return Err(ValidateError::Usage(
            "parse --n-gen 0: validate scores decode tokens, so it needs at least one".into(),
        ));
    }
    let corpus = Corpus::open(&a.corpus)?;
    let geo = super::moe_geometry(&a.model, "validate")?;
    let fingerprint = geo.fingerprint.to_string();
    let profile = Profile::read(&a.profile)?;
    profile.check_fresh(&fingerprint, &a.profile)?;
    if profile.n_layer() != geo.n_layer as usize || profile.n_expert() != geo.n_expert as usize {
        return Err(ValidateError::Usage(format!(
            "match {} to {}: the profile is {} layers × {} experts, the model {} × {}",
            a.profile.display(),
            a.model.display(),
            profile.n_layer(),
            profile.n_expert(),
            geo.n_layer,
            geo.n_expert
        )));
    }
    let slots = match (a.slots, a.budget_mib) {
        (Some(0), _) => {
            return Err(ValidateError::Usage(
                "parse --slots 0: give at least one slot per layer".into(),
            ))
        }
        (Some(s), _) => s.min(geo.n_expert),
        (None, Some(b)) => slots_for_budget(&geo, b).map_err(ValidateError::Usage)?,
        (None, None) => (geo.n_expert / 4).max(geo.n_expert_used).min(geo.n_expert),
    };
    let todo = jobs(&corpus, Split::Test, a.server.max_chunks)?;
    if todo.is_empty() {
        return Err(ValidateError::Usage(format!(
            "validate on {}: the corpus has no held-out chunks",
            a.corpus.display()
        )));
    }
    std::fs::create_dir_all(&a.report).map_err(|e| ValidateError::io(&a.report, e))?;
    // A private work directory: concurrent runs never share a log or temporary file.
    let work = crate::atomic_file::private_tempdir("spark-validate-")
        .map_err(|e| ValidateError::io(Path::new("a temporary directory"), e))?;
    let log = work.path().join("llama-server.log");
    let planned = todo.len();
    let mut runs: Vec<ChunkRun> = Vec::new();
    let result = match a
        .server
        .replay_config(&a.model, log.clone(), Some(deadline), interrupt)
    {
        Ok(cfg) => {
            let progress = super::SharedProgress::new(Progress::new("validate", planned, a.quiet));
            replay(
                &cfg,
                todo,
                |_| {
                    progress.borrow_mut().restart();
                    Ok(())
                },
                |run| {
                    progress
                        .borrow_mut()
                        .chunk(&run.key, (run.prompt_tokens + run.generated) as u64);
                    runs.push(run);
                    Ok(())
                },
            )
        }
        Err(e) => return Err(e),
    };
    // Keep the server's log with the report (best effort: the report matters more).
    if log.exists() {
        let _ = std::fs::read(&log)
            .map(|b| crate::atomic_file::write_atomic(&a.report.join("llama-server.log"), &b));
    }

    let mut header = TraceHeader::new(
        geo.n_layer,
        geo.n_expert,
        geo.n_expert_used,
        FLAG_WEIGHTS | FLAG_HAS_PROMPT,
    );
    let _ = header.set_fingerprint(&fingerprint);
    let n_layer = geo.n_layer as usize;
    let (mut decode, mut all) = (Routing::new(n_layer), Routing::new(n_layer));
    let mut result = result;
    for run in &runs {
        // Records the tap got wrong end the run with an error, never without a report.
        let t = match Trace::from_records(&header, &run.records, &a.report) {
            Ok(t) => t,
            Err(e) => {
                if result.is_ok() {
                    result = Err(e.into());
                }
                continue;
            }
        };
        append(&mut all, &t.prompt);
        append(&mut all, &t.decode);
        append(&mut decode, &t.decode);
    }
    let (n_expert, k) = (geo.n_expert as usize, geo.n_expert_used as usize);
    let counts = &profile.counts;
    let decode_scores = (decode.steps() > 0).then(|| score(&decode, n_expert, k, slots, counts));
    let all_scores = (all.steps() > 0).then(|| score(&all, n_expert, k, slots, counts));
    let mut curve = Vec::new();
    if decode.steps() > 0 {
        let mut points = default_slots(geo.n_expert_used, geo.n_expert);
        if !points.contains(&slots) {
            points.push(slots);
            points.sort_unstable();
        }
        for s in points {
            for row in score(&decode, n_expert, k, s, counts).rows {
                curve.push(CurvePoint {
                    slots: s,
                    set: row.set,
                    cold_rate: row.cold_rate,
                });
            }
        }
    }
    let spark_row = decode_scores
        .as_ref()
        .and_then(|s| s.rows.iter().find(|r| r.policy == PolicyKind::Spark.name()));
    let mut checks = Vec::new();
    if let Some(x) = a.min_hit_ratio {
        let v = spark_row.map(|r| r.hit_ratio);
        checks.push(CheckRow {
            name: "spark hit ratio ≥ --min-hit-ratio".into(),
            limit: x,
            value: v,
            ok: v.is_some_and(|v| v >= x),
        });
    }
    if let Some(x) = a.max_cold_rate {
        let v = spark_row.map(|r| r.cold_rate);
        checks.push(CheckRow {
            name: "spark cold-hit rate ≤ --max-cold-rate".into(),
            limit: x,
            value: v,
            ok: v.is_some_and(|v| v <= x),
        });
    }
    let result = result.and_then(|()| {
        if decode.steps() == 0 {
            let generated: usize = runs.iter().map(|r| r.generated).sum();
            let records: usize = runs.iter().map(|r| r.records.len()).sum();
            let why = if generated == 0 {
                "it generated no tokens".to_string()
            } else if records == 0 {
                format!(
                    "it generated {generated} tokens but no routing was captured (is the tap \
                     loaded? see llama-server.log next to the report)"
                )
            } else {
                format!(
                    "it generated {generated} tokens; of {records} routing records captured, \
                     none was a decoded token's"
                )
            };
            return Err(ValidateError::NothingScored(format!(
                "no decode token was scored: the server answered {} of {planned} chunks, {why}",
                runs.len(),
            )));
        }
        let missed: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| {
                format!(
                    "{} (limit {}, value {})",
                    c.name,
                    c.limit,
                    c.value.map_or("none".into(), |v| format!("{v:.4}"))
                )
            })
            .collect();
        if missed.is_empty() {
            Ok(())
        } else {
            Err(ValidateError::Threshold(missed.join("; ")))
        }
    });
    let (status, verdict) = verdict(&result, &checks, decode.steps(), runs.len(), planned);
    let report = Report {
        status,
        verdict,
        error: result.as_ref().err().map(|e| e.to_string()),
        model: a.model.display().to_string(),
        fingerprint,
        profile: a.profile.display().to_string(),
        corpus: a.corpus.display().to_string(),
        n_layer: geo.n_layer,
        n_expert: geo.n_expert,
        k: geo.n_expert_used,
        slots,
        budget_mib: a.budget_mib,
        chunk_tokens: a.server.chunk_tokens,
        n_gen: a.server.n_gen,
        chunks_planned: planned,
        chunks: runs
            .iter()
            .map(|r| ChunkRow {
                key: r.key.clone(),
                prompt_tokens: r.prompt_tokens,
                prompt_tps: r.prompt_tps,
                generated: r.generated,
                decode_tps: r.decode_tps,
                seconds: r.seconds,
                records: r.records.len(),
            })
            .collect(),
        prompt_tps_mean: mean(runs.iter().map(|r| r.prompt_tps)),
        decode_tps_mean: mean(runs.iter().map(|r| r.decode_tps)),
        decode: decode_scores,
        all_tokens: all_scores,
        curve,
        checks,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let (json, markdown) = write_report(&a.report, &report)?;
    result.map(|()| ValidateOutcome {
        report,
        json,
        markdown,
    })
}

/// Runs `spark validate` with Ctrl-C handling and prints the summary table.
pub fn run(a: &ValidateArgs) -> Result<(), ValidateError> {
    let interrupt = super::interrupt_on_signals()?;
    let o = validate(a, Some(interrupt)).inspect_err(|e| {
        let md = a.report.join("report.md");
        if e.exit_code() != crate::exit::USAGE && md.exists() {
            tracing::info!(
                target: crate::progress::TARGET,
                "spark validate: report ({}) in {}",
                e.status(),
                md.display()
            );
        }
    })?;
    println!(
        "{}: {} ({} held-out chunks, {} slots per layer)",
        o.markdown.display(),
        o.report.verdict,
        o.report.chunks.len(),
        o.report.slots
    );
    print!("{}", policy_table(&o.report));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One layer, four experts, top-1: the tokens use experts 2 and 3 in turn.
    fn routing() -> Routing {
        let mut r = Routing::new(1);
        for t in 0..10u32 {
            let ids = [2 + (t % 2) as u16];
            r.push_step(1, t, [(&ids[..], &[][..])]);
        }
        r
    }

    #[test]
    fn resident_sets_are_scored_on_the_same_lookups() {
        let mut profile = Counts::zero(1, 4);
        profile.set(0, 2, 50);
        profile.set(0, 3, 40);
        let s = score(&routing(), 4, 1, 2, &profile);
        let by = |name: &str| s.rows.iter().find(|r| r.set == name).unwrap().clone();
        // Uniform keeps experts 0 and 1: every lookup is cold.
        assert_eq!((by("uniform").cold, by("uniform").lookups), (10, 10));
        // The profile's top two are exactly the used ones.
        assert_eq!(by("calibrated static").cold, 0);
        // Two slots hold both used experts: the bound has no cold hit, so no ratio to it.
        assert_eq!(by("belady bound").cold, 0);
        assert_eq!(by("uniform").vs_belady, None);
        assert!(s.rows.iter().all(|r| r.lookups == 10));
    }

    #[test]
    fn the_verdict_says_what_happened_and_ended_early_only_when_it_did() {
        let check = |ok| CheckRow {
            name: "spark hit ratio ≥ --min-hit-ratio".into(),
            limit: 0.9,
            value: Some(0.5),
            ok,
        };
        let missed = ValidateError::Threshold(
            "spark hit ratio ≥ --min-hit-ratio (limit 0.9, value 0.5000)".into(),
        );
        let none = ValidateError::NothingScored("no decode token was scored: …".into());
        for (result, checks, status, starts) in [
            (
                Ok(()),
                vec![],
                "measured",
                "measured: 40 decode tokens scored; no thresholds",
            ),
            (
                Ok(()),
                vec![check(true)],
                "pass",
                "pass: 40 decode tokens scored; every",
            ),
            (
                Err(missed),
                vec![check(false)],
                "fail",
                "fail: missed spark hit ratio",
            ),
            (
                Err(none),
                vec![],
                "fail",
                "fail: no decode token was scored",
            ),
            (
                Err(ValidateError::Timeout(
                    "the whole-run deadline passed".into(),
                )),
                vec![check(true)],
                "timeout",
                "ended early, 1 of 2 chunks replayed: finish in time",
            ),
            (
                Err(ValidateError::Interrupted),
                vec![],
                "interrupted",
                "ended early, 1 of 2 chunks replayed: finish: interrupted",
            ),
        ] {
            let ended = status == "timeout" || status == "interrupted";
            let (st, line) = verdict(&result, &checks, 40, if ended { 1 } else { 2 }, 2);
            assert_eq!(st, status, "{line}");
            assert!(line.starts_with(starts), "{line}");
            assert_eq!(line.contains("ended early"), ended, "{line}");
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn markdown_names_every_resident_set_and_the_status() {
        let mut profile = Counts::zero(1, 4);
        profile.set(0, 2, 1);
        let scores = score(&routing(), 4, 1, 2, &profile);
        let table = scores_table(&scores);
        for (name, _) in SETS {
            assert!(table.contains(&format!("| {name} |")), "{table}");
        }
    }
}

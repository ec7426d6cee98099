//! `spark simulate`: replay a routing trace through every cache policy and score it.
//!
//! Owns the experiment: the first ⌊calibrate-frac × steps⌋ decode steps, in order, calibrate
//! (they warm recency policies and give counts to the static ones), the rest is scored; Belady
//! sees only the scored part, with its optimal preload. It reports misses, accesses, miss ratio,
//! bytes moved and the ratio to Belady per (slots, policy), as text, JSON or an SVG plot, and it
//! can score a profile's counts instead of the calibration part's. It never lets an online
//! policy see the scored routing ahead of time (the cache module's honesty rule).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cache::{self, Belady, Counts, Policy, PolicyKind, Setup};
use crate::gguf::{GgufError, GgufFile, MoeGeometry};
use crate::profile::{Profile, ProfileError};
use crate::svg;
use crate::trace::{Format, Routing, Trace, TraceError};
use crate::vram_plan::{self, VramPlanError, VramPlanInput};

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Model(#[from] GgufError),
    #[error(transparent)]
    VramPlan(#[from] VramPlanError),
    #[error("{0}")]
    Usage(String),
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SimulateError {
    /// The documented exit code: a budget that cannot fit is a refusal, anything else the
    /// user's input.
    pub fn exit_code(&self) -> i32 {
        match self {
            SimulateError::VramPlan(VramPlanError::BudgetTooSmall { .. }) => crate::exit::REFUSED,
            SimulateError::Write { .. } => crate::exit::CHECK_FAILED,
            _ => crate::exit::USAGE,
        }
    }
}

/// `spark simulate` flags.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Routing trace (.trace, .jsonl or .csv)
    #[arg(long)]
    pub trace: PathBuf,
    /// Trace format (default: from the extension)
    #[arg(long, value_enum)]
    pub from: Option<Format>,
    /// Slots per layer to try, comma-separated (default: k, 2k, 3k, 4k, 6k, 8k up to the experts)
    #[arg(long, value_delimiter = ',', conflicts_with = "budget_mib")]
    pub slots: Vec<u32>,
    /// VRAM budget for experts in MiB: layers get slots from the VRAM plan (needs expert sizes)
    #[arg(long)]
    pub budget_mib: Option<f64>,
    /// GGUF model that gives per-layer expert sizes (for --budget-mib and bytes moved)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Bytes of one expert, when no --model is given
    #[arg(long)]
    pub expert_bytes: Option<u64>,
    /// Fraction of decode steps, from the start, that calibrate instead of being scored
    #[arg(long, default_value_t = 0.5)]
    pub calibrate_frac: f64,
    /// Policies: all, or a comma-separated list of lru, lfu, lfru, static, pin-lru, belady, spark
    #[arg(long, default_value = "all")]
    pub policy: String,
    /// Score a profile (Spark CSV): its counts replace the calibration part's
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// Draw miss ratio against slots per policy as SVG
    #[arg(long, value_name = "OUT.svg")]
    pub plot: Option<PathBuf>,
}

/// Loads of one policy over the scored part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub misses: u64,
    pub accesses: u64,
    pub per_layer: Vec<u64>,
    /// Misses on an expert's first use in the trace (calibration included): every cache that
    /// starts empty pays these, a pre-filled one may not.
    pub first_use_misses: u64,
}

/// How a policy's cache holds experts before the first token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Start {
    /// Empty (the calibration part then replays through it).
    Cold,
    /// Filled from the profile's counts.
    Profile,
    /// Filled (pinned) from the calibration part's counts.
    CalibrationCounts,
    /// Filled by expert id: no counts are known before the first token.
    ExpertIds,
    /// Filled with what the scored part uses first (belady knows the future).
    Oracle,
}

impl Start {
    /// How `kind` starts: with counts from a profile or not, with calibration steps or not.
    pub fn of(kind: PolicyKind, profile: bool, calibrate_steps: usize) -> Start {
        match kind {
            PolicyKind::Lru | PolicyKind::Lfu | PolicyKind::Lfru => Start::Cold,
            PolicyKind::Belady => Start::Oracle,
            _ if profile => Start::Profile,
            PolicyKind::Spark => Start::ExpertIds,
            _ if calibrate_steps == 0 => Start::ExpertIds,
            _ => Start::CalibrationCounts,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Start::Cold => "cold",
            Start::Profile => "profile",
            Start::CalibrationCounts => "calibration-counts",
            Start::ExpertIds => "expert-ids",
            Start::Oracle => "oracle",
        }
    }

    fn words(self) -> &'static str {
        match self {
            Start::Cold => "starts cold",
            Start::Profile => "starts filled from the profile",
            Start::CalibrationCounts => "starts filled from the calibration counts",
            Start::ExpertIds => "starts filled by expert id",
            Start::Oracle => "starts filled with the future's first uses",
        }
    }
}

/// spark against lru at one slot count, like with like: all misses when both start alike,
/// else only misses on reuses (an expert's first use left out for both, since a cache that
/// starts empty must miss it and a pre-filled one may not).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Versus {
    pub slots: u32,
    /// `all-misses` or `reuse-misses`.
    pub basis: &'static str,
    pub spark: u64,
    pub lru: u64,
    /// (lru - spark) / lru × 100; null when lru has none on this basis.
    pub spark_fewer_pct: Option<f64>,
    pub spark_start: Start,
    pub lru_start: Start,
}

impl Versus {
    pub fn of(slots: u32, spark: (&Outcome, Start), lru: (&Outcome, Start)) -> Versus {
        let same = spark.1 == lru.1;
        let basis = |o: &Outcome| {
            if same {
                o.misses
            } else {
                o.misses - o.first_use_misses
            }
        };
        let (sp, lr) = (basis(spark.0), basis(lru.0));
        Versus {
            slots,
            basis: if same { "all-misses" } else { "reuse-misses" },
            spark: sp,
            lru: lr,
            spark_fewer_pct: (lr > 0).then(|| 100.0 * (lr as f64 - sp as f64) / lr as f64),
            spark_start: spark.1,
            lru_start: lru.1,
        }
    }

    /// One line for the table.
    pub fn line(&self) -> String {
        let what = if self.basis == "all-misses" {
            "misses".to_string()
        } else {
            format!(
                "misses on reuses (first uses left out: lru {}, spark {})",
                self.lru_start.words(),
                self.spark_start.words()
            )
        };
        match self.spark_fewer_pct {
            Some(p) if p >= 0.0 => format!(
                "slots {}: spark has {p:.1}% fewer {what} than lru ({} vs {})",
                self.slots, self.spark, self.lru
            ),
            Some(p) => format!(
                "slots {}: spark has {:.1}% more {what} than lru ({} vs {})",
                self.slots, -p, self.spark, self.lru
            ),
            None if self.spark == 0 => {
                format!("slots {}: spark and lru both have 0 {what}", self.slots)
            }
            None => format!(
                "slots {}: lru has 0 {what}, spark {}",
                self.slots, self.spark
            ),
        }
    }
}

/// The experiment, resolved from flags.
#[derive(Debug, Clone)]
pub struct Experiment<'a> {
    pub routing: &'a Routing,
    pub n_expert: usize,
    pub k: usize,
    /// Steps, from the start, that calibrate.
    pub calibrate_steps: usize,
    /// Counts that rank experts for pinning.
    pub counts: Counts,
    /// Counts known without replay (a profile).
    pub prior: Option<Counts>,
}

impl<'a> Experiment<'a> {
    /// The usual experiment: calibration counts from the first `calibrate_steps` steps.
    pub fn new(routing: &'a Routing, n_expert: usize, k: usize, calibrate_steps: usize) -> Self {
        let calibrate_steps = calibrate_steps.min(routing.steps());
        let counts = Counts::of(&routing.slice(0..calibrate_steps), n_expert);
        Experiment {
            routing,
            n_expert,
            k,
            calibrate_steps,
            counts,
            prior: None,
        }
    }

    /// Runs `kind` with `slots[l]` slots at layer `l`.
    pub fn run(&self, kind: PolicyKind, slots: &[u32]) -> Outcome {
        let r = self.routing;
        let n_layer = r.n_layer();
        let cal = r.slice(0..self.calibrate_steps);
        let mut policy: Box<dyn Policy> = match kind {
            PolicyKind::Belady => Box::new(Belady::new(
                &r.slice(self.calibrate_steps..r.steps()),
                self.n_expert,
                slots,
            )),
            _ => {
                let setup = Setup {
                    n_expert: self.n_expert,
                    k: self.k,
                    slots: slots.to_vec(),
                    counts: &self.counts,
                    prior: self.prior.as_ref(),
                    calibration: Some(&cal),
                };
                let mut p = cache::online(kind, &setup).expect("online policy");
                for s in 0..self.calibrate_steps {
                    for l in 0..n_layer {
                        p.access(l, r.ids(s, l));
                    }
                }
                p
            }
        };
        // Experts used before the scored part, then as it goes: a first use is a use of an
        // expert not in here.
        let n = self.n_expert;
        let mut seen = vec![false; n_layer * n];
        for s in 0..self.calibrate_steps {
            for l in 0..n_layer {
                for &e in r.ids(s, l) {
                    if let Some(x) = seen.get_mut(l * n + usize::from(e)) {
                        *x = true;
                    }
                }
            }
        }
        let mut per_layer = vec![0u64; n_layer];
        let mut accesses = 0u64;
        let mut first_use_misses = 0u64;
        for s in self.calibrate_steps..r.steps() {
            for (l, m) in per_layer.iter_mut().enumerate() {
                let ids = r.ids(s, l);
                for &e in ids {
                    if usize::from(e) < n && !seen[l * n + usize::from(e)] {
                        seen[l * n + usize::from(e)] = true;
                        if !policy.is_resident(l, e) {
                            first_use_misses += 1;
                        }
                    }
                }
                *m += u64::from(policy.access(l, ids));
                accesses += ids.len() as u64;
            }
        }
        Outcome {
            misses: per_layer.iter().sum(),
            accesses,
            per_layer,
            first_use_misses,
        }
    }
}

/// One line of the result table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Slots per layer (the mean when layers differ).
    pub slots: u32,
    pub policy: String,
    /// How the policy's cache holds experts before the first token.
    pub start: Start,
    pub misses: u64,
    /// Misses on an expert's first use in the trace (a cold cache cannot avoid them).
    pub first_use_misses: u64,
    pub accesses: u64,
    pub miss_ratio: f64,
    /// misses ÷ belady's misses at the same slots; null when belady has none and this does.
    pub vs_belady: Option<f64>,
    /// Bytes loaded into VRAM, when expert sizes are known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_moved: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots_per_layer: Option<Vec<u32>>,
}

/// What `spark simulate` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub trace: String,
    pub layers: u32,
    pub steps: usize,
    pub k: u32,
    pub experts: u32,
    pub calibrate_steps: usize,
    pub scored_steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub results: Vec<Row>,
    /// spark against lru at each slot count, like with like.
    pub spark_vs_lru: Vec<Versus>,
    /// Knee of each policy's miss curve (slots per layer), where there are enough points.
    pub knee: BTreeMap<String, u32>,
}

/// Parses `all` or a comma-separated list of policy names (belady always runs: it is the
/// denominator, and it is reported only when asked for).
pub fn parse_policies(s: &str) -> Result<Vec<PolicyKind>, SimulateError> {
    if s.trim() == "all" {
        return Ok(PolicyKind::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let p = PolicyKind::from_name(name).ok_or_else(|| {
            SimulateError::Usage(format!(
                "parse --policy: unknown policy {name:?} (all, lru, lfu, lfru, static, pin-lru, belady, spark)"
            ))
        })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(SimulateError::Usage(
            "parse --policy: no policy named".into(),
        ));
    }
    Ok(out)
}

/// The default slot counts: k, 2k, 3k, 4k, 6k, 8k, kept below the expert count (plus one
/// point at it when nothing else is).
pub fn default_slots(k: u32, n_expert: u32) -> Vec<u32> {
    let mut v: Vec<u32> = [1, 2, 3, 4, 6, 8]
        .iter()
        .map(|m| m * k)
        .filter(|&s| s <= n_expert)
        .collect();
    if v.is_empty() {
        v.push(n_expert);
    }
    v
}

/// Per-layer expert sizes from a model, matched to the trace's layers.
fn model_expert_bytes(path: &Path, trace: &Trace) -> Result<Vec<u64>, SimulateError> {
    let file = GgufFile::open(path)?;
    let geo = MoeGeometry::of(&file)?;
    if let Some(fp) = &trace.fingerprint {
        let model_fp = geo.fingerprint.to_string();
        if *fp != model_fp {
            return Err(SimulateError::Usage(format!(
                "match {} to the trace: the trace was recorded on model {fp}, this is {model_fp}",
                path.display()
            )));
        }
    }
    let n = trace.n_layer as usize;
    let by_block = |l: usize| {
        geo.moe_layers
            .iter()
            .find(|m| m.layer as usize == l)
            .map(|m| m.expert_bytes)
    };
    let sizes: Option<Vec<u64>> = if geo.moe_layers.len() == n {
        Some(geo.moe_layers.iter().map(|m| m.expert_bytes).collect())
    } else {
        (0..n).map(by_block).collect()
    };
    sizes.ok_or_else(|| {
        SimulateError::Usage(format!(
            "match {} to the trace: it has {} MoE layers, the trace {n}",
            path.display(),
            geo.moe_layers.len()
        ))
    })
}

/// Runs the whole experiment the flags describe.
pub fn simulate(args: &SimulateArgs) -> Result<Report, SimulateError> {
    if !(0.0..1.0).contains(&args.calibrate_frac) {
        return Err(SimulateError::Usage(format!(
            "parse --calibrate-frac {}: must be at least 0 and below 1",
            args.calibrate_frac
        )));
    }
    let policies = parse_policies(&args.policy)?;
    let trace = Trace::read(&args.trace, args.from)?;
    let routing = &trace.decode;
    if routing.steps() < 2 {
        return Err(SimulateError::Usage(format!(
            "simulate {}: {} decode steps, at least 2 are needed",
            args.trace.display(),
            routing.steps()
        )));
    }
    let mut n_expert = trace.n_expert;
    let profile = match &args.profile {
        Some(p) => {
            let prof = Profile::read(p)?;
            if let Some(fp) = &trace.fingerprint {
                prof.check_fresh(fp, p)?;
            }
            if prof.n_layer() != trace.n_layer as usize || (prof.n_expert() as u32) < n_expert {
                return Err(SimulateError::Usage(format!(
                    "score {}: it has {} layers × {} experts, the trace {} × {}",
                    p.display(),
                    prof.n_layer(),
                    prof.n_expert(),
                    trace.n_layer,
                    trace.n_expert
                )));
            }
            n_expert = prof.n_expert() as u32;
            Some(prof)
        }
        None => None,
    };
    let k = trace.k;
    let expert_bytes: Option<Vec<u64>> = match (&args.model, args.expert_bytes) {
        (Some(m), _) => Some(model_expert_bytes(m, &trace)?),
        (None, Some(b)) => Some(vec![b; trace.n_layer as usize]),
        (None, None) => None,
    };
    let calibrate_steps = (args.calibrate_frac * routing.steps() as f64).floor() as usize;
    let mut exp = Experiment::new(routing, n_expert as usize, k as usize, calibrate_steps);
    if let Some(p) = &profile {
        exp.counts = p.counts.clone();
        exp.prior = Some(p.counts.clone());
    }
    // Slot configurations: uniform lists, or one from the budget's VRAM plan.
    let n_layer = trace.n_layer as usize;
    let configs: Vec<(u32, Vec<u32>, bool)> = match args.budget_mib {
        Some(mib) => {
            let Some(sizes) = &expert_bytes else {
                return Err(SimulateError::Usage(
                    "use --budget-mib: expert sizes are unknown (pass --model or --expert-bytes)"
                        .into(),
                ));
            };
            if !(mib.is_finite() && mib > 0.0) {
                return Err(SimulateError::Usage(format!(
                    "parse --budget-mib {mib}: must be positive"
                )));
            }
            let plan = vram_plan::place(&VramPlanInput {
                counts: &exp.counts,
                expert_bytes: sizes,
                budget: (mib * 1024.0 * 1024.0) as u64,
                floor: k,
            })?;
            let slots = plan.slots();
            let mean = (slots.iter().map(|&s| u64::from(s)).sum::<u64>() / n_layer as u64) as u32;
            vec![(mean, slots, true)]
        }
        None => {
            let list = if args.slots.is_empty() {
                default_slots(k, n_expert)
            } else {
                args.slots.clone()
            };
            let mut out = Vec::new();
            for s in list {
                if s < k {
                    return Err(SimulateError::Usage(format!(
                        "parse --slots {s}: below k={k}, so one token's experts would not fit"
                    )));
                }
                out.push((s, vec![s; n_layer], false));
            }
            out
        }
    };
    let mut results = Vec::new();
    let mut spark_vs_lru = Vec::new();
    let start = |p| Start::of(p, profile.is_some(), exp.calibrate_steps);
    for (label, slots, per_layer) in &configs {
        let belady = exp.run(PolicyKind::Belady, slots);
        let mut outcomes = Vec::new();
        for &p in &policies {
            let o = if p == PolicyKind::Belady {
                belady.clone()
            } else {
                exp.run(p, slots)
            };
            outcomes.push((p, o.clone()));
            let vs = match (o.misses, belady.misses) {
                (0, 0) => Some(1.0),
                (_, 0) => None,
                (m, b) => Some(m as f64 / b as f64),
            };
            let bytes_moved = expert_bytes
                .as_ref()
                .map(|sz| o.per_layer.iter().zip(sz).map(|(m, b)| m * b).sum());
            results.push(Row {
                slots: *label,
                policy: p.name().to_string(),
                start: start(p),
                misses: o.misses,
                first_use_misses: o.first_use_misses,
                accesses: o.accesses,
                miss_ratio: o.misses as f64 / o.accesses.max(1) as f64,
                vs_belady: vs,
                bytes_moved,
                slots_per_layer: per_layer.then(|| slots.clone()),
            });
        }
        let get = |k| outcomes.iter().find(|(p, _)| *p == k).map(|(_, o)| o);
        if let (Some(sp), Some(lru)) = (get(PolicyKind::Spark), get(PolicyKind::Lru)) {
            spark_vs_lru.push(Versus::of(
                *label,
                (sp, start(PolicyKind::Spark)),
                (lru, start(PolicyKind::Lru)),
            ));
        }
    }
    let mut knee = BTreeMap::new();
    for &p in &policies {
        let curve: Vec<(u32, f64)> = results
            .iter()
            .filter(|r| r.policy == p.name())
            .map(|r| (r.slots, r.miss_ratio))
            .collect();
        if let Some(s) = vram_plan::knee(&curve) {
            knee.insert(p.name().to_string(), s);
        }
    }
    let report = Report {
        trace: args.trace.display().to_string(),
        layers: trace.n_layer,
        steps: routing.steps(),
        k,
        experts: n_expert,
        calibrate_steps: exp.calibrate_steps,
        scored_steps: routing.steps() - exp.calibrate_steps,
        profile: args.profile.as_ref().map(|p| p.display().to_string()),
        results,
        spark_vs_lru,
        knee,
    };
    if let Some(out) = &args.plot {
        let svg = plot(&report);
        crate::atomic_file::write_atomic(out, svg.as_bytes()).map_err(|source| {
            SimulateError::Write {
                path: out.clone(),
                source,
            }
        })?;
    }
    Ok(report)
}

/// The SVG of miss ratio against slots, one line per policy.
pub fn plot(report: &Report) -> String {
    let mut series: Vec<svg::Series> = Vec::new();
    for r in &report.results {
        let point = (f64::from(r.slots), r.miss_ratio);
        match series.iter_mut().find(|s| s.name == r.policy) {
            Some(s) => s.points.push(point),
            None => series.push(svg::Series {
                name: r.policy.clone(),
                points: vec![point],
            }),
        }
    }
    let name = Path::new(&report.trace)
        .file_name()
        .map_or(report.trace.clone(), |n| n.to_string_lossy().into_owned());
    svg::line_chart(
        &format!(
            "miss ratio vs slots per layer: {name} ({} scored steps)",
            report.scored_steps
        ),
        "slots per layer",
        "miss ratio",
        &series,
    )
}

/// The table `spark simulate` prints.
pub fn render(report: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "trace {}: {} layers, {} experts, k={}, {} decode steps ({} calibrate, {} scored){}",
        report.trace,
        report.layers,
        report.experts,
        report.k,
        report.steps,
        report.calibrate_steps,
        report.scored_steps,
        report
            .profile
            .as_ref()
            .map_or(String::new(), |p| format!(", counts from profile {p}"))
    );
    let with_bytes = report.results.iter().any(|r| r.bytes_moved.is_some());
    let _ = writeln!(
        o,
        "{:>6}  {:<8} {:<18} {:>10} {:>10} {:>10} {:>10} {:>10}{}",
        "slots",
        "policy",
        "start",
        "misses",
        "first_use",
        "accesses",
        "miss_ratio",
        "vs_belady",
        if with_bytes { "  bytes_moved" } else { "" }
    );
    for r in &report.results {
        let _ = writeln!(
            o,
            "{:>6}  {:<8} {:<18} {:>10} {:>10} {:>10} {:>10.4} {:>10}{}",
            r.slots,
            r.policy,
            r.start.name(),
            r.misses,
            r.first_use_misses,
            r.accesses,
            r.miss_ratio,
            r.vs_belady.map_or("-".into(), |v| format!("{v:.3}")),
            r.bytes_moved
                .map_or(String::new(), |b| format!("  {b:>11}"))
        );
    }
    let _ = writeln!(
        o,
        "start: cold = empty before the first token (calibration replays through it); calibration-counts, profile, expert-ids = filled before it from those; oracle = filled with the scored part's first uses. first_use = misses on an expert's first use in the trace."
    );
    for v in &report.spark_vs_lru {
        let _ = writeln!(o, "{}", v.line());
    }
    for (p, s) in &report.knee {
        let _ = writeln!(o, "knee of the {p} miss curve: {s} slots per layer");
    }
    if let Some(r) = report
        .results
        .first()
        .filter(|r| r.slots_per_layer.is_some())
    {
        let _ = writeln!(
            o,
            "slots per layer from the budget placement: {:?}",
            r.slots_per_layer.as_ref().expect("checked")
        );
    }
    o
}

/// Runs `spark simulate`, printing the table or JSON.
pub fn run(args: &SimulateArgs) -> Result<(), SimulateError> {
    let report = simulate(args)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        print!("{}", render(&report));
        if let Some(p) = &args.plot {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn routing(n_layer: usize, steps: &[Vec<Vec<u16>>]) -> Routing {
        let mut r = Routing::new(n_layer);
        for (i, s) in steps.iter().enumerate() {
            r.push_step(0, i as u32, s.iter().map(|l| (l.as_slice(), &[][..])));
        }
        r
    }

    #[test]
    fn calibration_warms_but_is_not_scored() {
        // One layer, 2 slots: calibrate on {1},{2}; scored {1},{2}: LRU hits both.
        let r = routing(
            1,
            &[vec![vec![1]], vec![vec![2]], vec![vec![1]], vec![vec![2]]],
        );
        let exp = Experiment::new(&r, 4, 1, 2);
        let o = exp.run(PolicyKind::Lru, &[2]);
        assert_eq!((o.misses, o.accesses), (0, 2));
        // Without calibration every first use is a load.
        let exp = Experiment::new(&r, 4, 1, 0);
        assert_eq!(exp.run(PolicyKind::Lru, &[2]).misses, 2);
        // Belady preloads the scored part's first experts: no loads either way.
        assert_eq!(exp.run(PolicyKind::Belady, &[2]).misses, 0);
    }

    #[test]
    fn policies_parse() {
        assert_eq!(parse_policies("all").unwrap().len(), 7);
        assert_eq!(
            parse_policies("lru, spark,lru").unwrap(),
            vec![PolicyKind::Lru, PolicyKind::Spark]
        );
        assert!(parse_policies("lru,nope").is_err());
        assert_eq!(default_slots(8, 64), vec![8, 16, 24, 32, 48, 64]);
        assert_eq!(default_slots(8, 6), vec![6]);
    }

    fn random_trace() -> impl Strategy<Value = (usize, usize, Vec<Vec<Vec<u16>>>)> {
        (1usize..4, 3usize..12, 1usize..4).prop_flat_map(|(n_layer, n_expert, k)| {
            let k = k.min(n_expert);
            let step = proptest::collection::vec(
                proptest::sample::subsequence((0..n_expert as u16).collect::<Vec<_>>(), k)
                    .prop_shuffle(),
                n_layer,
            );
            (
                Just(n_layer),
                Just(n_expert),
                proptest::collection::vec(step, 2..60),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn belady_is_never_beaten((n_layer, n_expert, steps) in random_trace(), extra in 0u32..6, frac in 0.0f64..0.9) {
            let k = steps[0][0].len();
            let r = routing(n_layer, &steps);
            let cal = (frac * steps.len() as f64) as usize;
            let exp = Experiment::new(&r, n_expert, k, cal);
            let slots = vec![(k as u32 + extra).min(n_expert as u32); n_layer];
            let b = exp.run(PolicyKind::Belady, &slots).misses;
            for p in PolicyKind::ALL {
                let m = exp.run(p, &slots).misses;
                prop_assert!(m >= b, "{} {} < belady {}", p.name(), m, b);
            }
        }
    }
}

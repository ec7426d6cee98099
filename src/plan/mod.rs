//! `spark plan`: what fits, which flags, how fast — a forecast from GGUF metadata and hardware
//! facts, calibrated by receipts (llama-bench measurements paired with plans).
//!
//! Owns the planner: hardware facts ([`hardware`]), memory fit and flags ([`fit`]), the roofline
//! forecast ([`forecast`]), receipts ([`receipt`]), the routing-concentration verdict
//! ([`routing`]) and the validation bench ([`validate`]). The planning itself is arithmetic on
//! facts handed in; only the receipt path runs llama-bench, and only through
//! [`crate::supervisor::run_with_deadline`]. Never spawns a process itself, never writes a file
//! except the per-machine hardware profile and receipt store (atomically).

pub mod cli;
pub mod fit;
pub mod forecast;
pub mod hardware;
pub mod llama_bench;
pub mod machine;
pub mod median;
pub mod presets;
pub mod receipt;
pub mod render;
pub mod residency;
pub mod routing;
pub mod type_cost;
pub mod type_probe;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::engine::EngineError;
use crate::gguf::{GgmlType, GgufError, GgufFile, MoeGeometry};
use crate::supervisor::RunError;
use crate::units::MIB;

use cli::{PlanAction, PlanArgs, PlanCommand};
use fit::{FitOutcome, MemorySettings, ModelFacts, Placement, Refusal};
use forecast::{Forecast, RooflineInput};
use hardware::{HardwareError, HardwareFacts};
use receipt::{Receipt, ReceiptError, ReceiptStore};
use render::render;
use routing::Concentration;

/// Why planning failed. Messages read after "failed to".
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Hardware(#[from] HardwareError),
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("run llama-bench: it exited with {status}; last output:\n{tail}")]
    BenchFailed { status: String, tail: String },
    #[error("fit {model}: {reason}")]
    Refused { model: String, reason: String },
    #[error("read routing {path}: {message}")]
    Routing { path: PathBuf, message: String },
    #[error("validate the forecast: {0}")]
    Validation(String),
}

impl PlanError {
    /// The exit code this error maps to (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            PlanError::Refused { .. } => crate::exit::REFUSED,
            PlanError::Run(e) if e.is_timeout() => crate::exit::TIMEOUT,
            PlanError::Run(_) | PlanError::BenchFailed { .. } | PlanError::Validation(_) => {
                crate::exit::CHECK_FAILED
            }
            PlanError::Hardware(HardwareError::Write { .. })
            | PlanError::Receipt(ReceiptError::Write { .. }) => crate::exit::CHECK_FAILED,
            _ => crate::exit::USAGE,
        }
    }
}

/// Resolved settings of one plan.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub model: PathBuf,
    pub settings: MemorySettings,
    pub budget_bytes: Option<u64>,
    pub threads: u32,
    pub depth: u64,
    pub use_receipts: bool,
}

impl PlanInput {
    pub fn from_args(a: &PlanArgs) -> Result<PlanInput, PlanError> {
        let model = a
            .model
            .clone()
            .ok_or_else(|| PlanError::Usage("plan: -m/--model GGUF is required".into()))?;
        let ty = |flag: &str, name: &str| {
            GgmlType::from_name(name)
                .filter(|t| KV_TYPES.contains(&t.name))
                .ok_or_else(|| {
                    PlanError::Usage(format!(
                        "parse {flag} {name}: not a KV-cache type ({})",
                        KV_TYPES.join(", ")
                    ))
                })
        };
        if a.ctx == 0 {
            return Err(PlanError::Usage("parse --ctx 0: must be at least 1".into()));
        }
        if a.ubatch == 0 {
            return Err(PlanError::Usage(
                "parse --ubatch 0: must be at least 1".into(),
            ));
        }
        if a.threads == Some(0) {
            return Err(PlanError::Usage(
                "parse --threads 0: must be at least 1".into(),
            ));
        }
        a.hardware.validate()?;
        let threads = a.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        });
        Ok(PlanInput {
            model,
            settings: MemorySettings {
                ctx: a.ctx,
                k_type: ty("--cache-type-k", &a.cache_type_k)?,
                v_type: ty("--cache-type-v", &a.cache_type_v)?,
                ubatch: a.ubatch,
                reserve_bytes: a.reserve.saturating_mul(MIB),
            },
            budget_bytes: a.vram_budget.map(|b| b.saturating_mul(MIB)),
            threads,
            depth: a.depth,
            use_receipts: !a.no_receipts,
        })
    }
}

/// KV-cache types llama.cpp accepts for `--cache-type-k/-v`.
pub const KV_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1",
];

/// A complete plan: memory, placement or refusal, flags, forecast, routing verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model: ModelFacts,
    pub settings: MemorySettings,
    pub budget_bytes: Option<u64>,
    pub memory: MemoryReport,
    pub outcome: FitOutcome,
    /// llama-server flags (empty when refused).
    pub flags: Vec<String>,
    pub forecast: Option<Forecast>,
    pub routing: Option<Concentration>,
    pub hardware: HardwareFacts,
    pub threads: u32,
}

/// The memory table.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub always_resident_bytes: u64,
    pub embeddings_host_bytes: u64,
    pub routed_expert_bytes_per_layer: Vec<(u32, u64)>,
    pub routed_expert_bytes: u64,
    pub kv_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub compute_bytes: u64,
    pub reserve_bytes: u64,
}

impl Plan {
    pub fn placement(&self) -> Option<Placement> {
        match &self.outcome {
            FitOutcome::Fits { placement, .. } => Some(*placement),
            FitOutcome::Refused(_) => None,
        }
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.outcome {
            FitOutcome::Refused(r) => Some(r),
            FitOutcome::Fits { .. } => None,
        }
    }
}

/// Opens the model and derives its facts.
pub fn model_facts(path: &Path) -> Result<ModelFacts, PlanError> {
    let file = GgufFile::open(path)?;
    let geometry = MoeGeometry::of(&file)?;
    Ok(ModelFacts::of(&file, geometry))
}

/// Builds the plan for `input` on `hw`, folding in `store`'s receipts (skipping those `exclude`
/// names) and a routing verdict.
pub fn make_plan(
    model: ModelFacts,
    input: &PlanInput,
    hw: HardwareFacts,
    store: Option<&ReceiptStore>,
    routing: Option<Concentration>,
) -> Plan {
    let s = input.settings;
    let o = fit::overheads(&model, &s);
    let memory = MemoryReport {
        always_resident_bytes: model.gpu_always_bytes(),
        embeddings_host_bytes: model.host_always_bytes(),
        routed_expert_bytes_per_layer: model
            .expert_layers
            .iter()
            .map(|(l, _)| (*l, model.layer_expert_bytes(*l)))
            .collect(),
        routed_expert_bytes: model.experts_total(),
        kv_bytes: o.kv_bytes,
        kv_bytes_per_token: model.geometry.kv_bytes_per_token(s.k_type, s.v_type),
        compute_bytes: o.compute_bytes,
        reserve_bytes: o.reserve_bytes,
    };
    let outcome = fit::fit(&model, &s, input.budget_bytes, hw.ram_total_bytes);
    let (flags, forecast) = match &outcome {
        FitOutcome::Fits {
            placement,
            headroom_bytes,
            ..
        } => {
            let hit = routing
                .as_ref()
                .and_then(|c| c.cache_hit_ratio(&model, *placement, *headroom_bytes));
            let f = forecast_for(&model, input, &hw, *placement, hit, store, |_| false);
            (
                fit::server_flags(&model, &s, *placement, input.threads),
                Some(f),
            )
        }
        FitOutcome::Refused(_) => (Vec::new(), None),
    };
    Plan {
        memory,
        settings: s,
        budget_bytes: input.budget_bytes,
        outcome,
        flags,
        forecast,
        routing,
        hardware: hw,
        threads: input.threads,
        model,
    }
}

/// The forecast of one placement, calibrated by the receipts `exclude` lets through.
pub fn forecast_for(
    model: &ModelFacts,
    input: &PlanInput,
    hw: &HardwareFacts,
    placement: Placement,
    cache_hit_ratio: Option<f64>,
    store: Option<&ReceiptStore>,
    exclude: impl Fn(&Receipt) -> bool,
) -> Forecast {
    let s = input.settings;
    let roof = forecast::roofline(
        model,
        hw,
        &RooflineInput {
            placement,
            threads: input.threads,
            depth: input.depth,
            kv_bytes_per_token: model.geometry.kv_bytes_per_token(s.k_type, s.v_type),
            cache_hit_ratio,
        },
    );
    let (d, p) = match store.filter(|_| input.use_receipts) {
        Some(st) => st.efficiencies(&hw.machine.key(), roof.regime, input.threads, exclude),
        None => (Vec::new(), Vec::new()),
    };
    forecast::forecast(roof, &d, &p)
}

/// Loads the receipt store unless the plan ignores receipts.
fn load_store(use_receipts: bool) -> Result<Option<ReceiptStore>, PlanError> {
    if !use_receipts {
        return Ok(None);
    }
    Ok(Some(ReceiptStore::load(&receipt::store_path())?))
}

fn load_routing(a: &PlanArgs, model: &ModelFacts) -> Result<Option<Concentration>, PlanError> {
    match (&a.profile, &a.trace) {
        (Some(path), _) => routing::from_profile(path, model).map(Some),
        (None, Some(path)) => routing::from_trace(path, model).map(Some),
        (None, None) => Ok(None),
    }
}

/// `spark plan`: prints the plan; a refusal is printed and returned as an error (exit 3).
pub fn run(cmd: PlanCommand) -> Result<(), PlanError> {
    match cmd.action {
        Some(PlanAction::Receipt(a)) => llama_bench::run_receipt(*a),
        Some(PlanAction::Probe(a)) => type_probe::run(a),
        Some(PlanAction::Hardware(a)) => {
            a.hardware.validate()?;
            let hw = hardware::gather(&a.hardware.overrides())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&hw).expect("serialize"));
            } else {
                println!(
                    "machine    {} ({} logical CPUs, key {})",
                    hw.machine.cpu_model,
                    hw.machine.logical_cpus,
                    hw.machine.key()
                );
                println!(
                    "RAM        {} total, {} available",
                    crate::units::mib(hw.ram_total_bytes),
                    crate::units::mib(hw.ram_available_bytes)
                );
                for pt in &hw.host_read_gbps {
                    println!("host read  {:>6.1} GB/s at {} threads", pt.rate, pt.threads);
                }
                for pt in &hw.host_gflops {
                    println!(
                        "compute    {:>6.1} GFLOP/s at {} threads",
                        pt.rate, pt.threads
                    );
                }
                if let Some(c) = &hw.type_costs {
                    print!("{}", type_probe::render(c));
                }
                for s in &hw.sources {
                    println!("source     {s}");
                }
            }
            Ok(())
        }
        None => {
            let input = PlanInput::from_args(&cmd.plan)?;
            let model = model_facts(&input.model)?;
            let routing = load_routing(&cmd.plan, &model)?;
            let hw = hardware::gather(&cmd.plan.hardware.overrides())?;
            let store = load_store(input.use_receipts)?;
            let plan = make_plan(model, &input, hw, store.as_ref(), routing);
            let res = if cmd.plan.residency && plan.refusal().is_none() {
                Some(residency::for_plan(
                    &cmd.plan,
                    &input,
                    &plan,
                    store.as_ref(),
                )?)
            } else {
                None
            };
            if cmd.plan.json {
                let v = match &res {
                    Some(r) => serde_json::json!({ "plan": &plan, "residency": r }),
                    None => serde_json::to_value(&plan).expect("serialize"),
                };
                println!("{}", serde_json::to_string_pretty(&v).expect("serialize"));
            } else {
                print!("{}", render(&plan));
                if let Some(r) = &res {
                    print!("{}", residency::render(r));
                }
            }
            match plan.refusal() {
                Some(r) => Err(PlanError::Refused {
                    model: plan.model.path.clone(),
                    reason: r.reason.clone(),
                }),
                None => Ok(()),
            }
        }
    }
}

